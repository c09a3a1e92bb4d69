"""Tokenizers the Processor reads text with: the built-in ByteTokenizer, or a Hugging Face one.

Each has vocab_size, bos_token_id / eos_token_id (None: not added) and encode(text) -> ids with
no special tokens of its own (the Processor adds bos / eos around the whole item).
"""
from __future__ import annotations


class ByteTokenizer:
    """The built-in tokenizer: UTF-8 bytes are ids 0..255; pad 256, bos 257, eos 258. No download."""
    vocab_size = 259
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A Hugging Face tokenizer seen through the Processor's small interface.

    bos is the tokenizer's cls token (BERT) or else its bos token; eos its sep token or else eos.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = len(tokenizer)
        cls_id = getattr(tokenizer, "cls_token_id", None)
        sep_id = getattr(tokenizer, "sep_token_id", None)
        self.bos_token_id = cls_id if cls_id is not None else getattr(tokenizer, "bos_token_id", None)
        self.eos_token_id = sep_id if sep_id is not None else getattr(tokenizer, "eos_token_id", None)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(spec):
    """"bytes" -> ByteTokenizer; a path -> the Hugging Face tokenizer there; a tokenizer -> wrapped."""
    if spec is None:
        return None
    if isinstance(spec, (ByteTokenizer, HFTokenizer)):
        return spec
    if isinstance(spec, str):
        if spec == "bytes":
            return ByteTokenizer()
        import os

        from transformers import AutoTokenizer

        # Local directories only: a hub id would be fetched from the network.
        if not os.path.isdir(spec):
            raise ValueError(f"tokenizer {spec!r} is not a local directory (hub ids are not fetched; "
                             f"download the tokenizer and pass its path, or pass a tokenizer object)")
        return HFTokenizer(AutoTokenizer.from_pretrained(spec, local_files_only=True))
    if callable(spec) and hasattr(spec, "convert_tokens_to_ids"):
        return HFTokenizer(spec)
    raise TypeError(f"tokenizer must be 'bytes', a path to a Hugging Face tokenizer, or a tokenizer object, "
                    f"got {type(spec).__name__}")
