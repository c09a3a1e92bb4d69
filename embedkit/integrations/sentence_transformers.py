"""sentence-transformers drop-in: ``accelerate(model)`` makes ``model.encode`` run packed.

    from embedkit.integrations.sentence_transformers import accelerate
    model = accelerate(SentenceTransformer(path))       # in place; returns the same model
    embeddings = model.encode(sentences)                 # same embeddings, faster

What changes (in ``encode`` / ``encode_query`` / ``encode_document`` of text inputs for the
sentence embedding; every other call runs sentence-transformers' own code, on the "embedkit"
attention):

1. Token-budget batching: all inputs are tokenized first (with the model's own ``preprocess``:
   same prompts, truncation and special tokens), sorted by length, and packed back to back, up to
   ``max_tokens`` tokens per step, instead of ``batch_size`` sequences padded to the longest.
2. The transformer runs padding-free on the varlen kernel (`embedkit.integrations.transformers`:
   attention implementation "embedkit", one packed row, cu_seqlens in kwargs).
3. Pooling (mean, cls or last token) + Dense (identity activation) + Normalize run as one
   `embedkit.ops.pool_project`; Pooling with no such Dense runs as `embedkit.ops.masked_mean`
   (then sentence-transformers' Normalize, if the model has one). A prompt excluded from pooling
   (``include_prompt=False``) becomes the ``pool_mask``, and so do cls / last-token pooling (a
   mask that keeps one token).

``batch_size`` is ignored on the packed path (``max_tokens`` bounds the step instead).

Supported sentence-transformers versions: SUPPORTED_VERSIONS (the ones tested). The override hooks
the private ``SentenceTransformer._inference`` and reads ``preprocess``' output and module
internals, which can change in any minor release, so another version is refused at import and in
``accelerate`` with a message naming both; EMBEDKIT_ALLOW_UNTESTED_SENTENCE_TRANSFORMERS=1 turns the
refusal into a warning (at your own risk: check the embeddings against the plain model).
"""
from __future__ import annotations

import inspect
import os
import warnings

import numpy as np
import sentence_transformers as _st
import torch

SUPPORTED_VERSIONS = (">=6.2", "<6.3")
ALLOW_UNTESTED_ENV = "EMBEDKIT_ALLOW_UNTESTED_SENTENCE_TRANSFORMERS"


def check_version(version: str | None = None) -> None:
    """Raise ImportError unless sentence-transformers `version` (default: the installed one) is in
    SUPPORTED_VERSIONS (a warning instead when ALLOW_UNTESTED_ENV is "1")."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    version = _st.__version__ if version is None else version
    spec = SpecifierSet(",".join(SUPPORTED_VERSIONS))
    try:
        ok = Version(version) in spec
    except InvalidVersion:
        ok = False
    if ok:
        return
    msg = (f"embedkit.integrations.sentence_transformers supports sentence-transformers {spec}, found {version}: "
           "accelerate() overrides the private SentenceTransformer._inference, whose contract changes between "
           f"releases. Install a supported version (pip install 'sentence-transformers{spec}') or set "
           f"{ALLOW_UNTESTED_ENV}=1 to try this one anyway")
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return
    raise ImportError(msg)


check_version()  # before the imports below: on other versions they may not exist at all

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.base.modules import Dense, Normalize, Transformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

import embedkit.ops as ops  # noqa: E402
from embedkit.integrations import transformers as ek_transformers  # noqa: E402
from embedkit.model._batching import token_budget_batches  # noqa: E402

DEFAULT_MAX_TOKENS = 16384
_TOKENIZE_CHUNK = 1024
_POOL_MODES = ("mean", "cls", "lasttoken")
_TOKEN_KEYS = {"input_ids", "attention_mask", "token_type_ids", "modality", "prompt_length"}


def accelerate(model: SentenceTransformer, *, max_tokens: int = DEFAULT_MAX_TOKENS,
               compile: bool | dict = False) -> SentenceTransformer:
    """Switch a SentenceTransformer to embedkit's packed encode path. In place; returns the model.

    The model's first module must be a sentence-transformers Transformer over a Hugging Face model
    that routes attention through transformers' AttentionInterface (BERT family, Llama, Qwen2/3,
    Mistral, Gemma, ...). Its attention implementation becomes "embedkit" for every call.

    compile: run each packed step's transformer forward through torch.compile(fullgraph=True,
    dynamic=True): True for torch.compile's defaults (inductor), or a dict of torch.compile
    keywords (e.g. {"backend": "aot_eager"}, {"mode": "max-autotune"}). The step is packed on the
    host, outside the compiled call, so one graph serves every step (any number of inputs, any
    lengths); the first encode pays the compile. Only the packed path is compiled (the fallback
    for other outputs runs sentence-transformers' code eagerly). False (default): eager.
    """
    check_version()
    if not isinstance(model, SentenceTransformer):
        raise TypeError(f"model must be a SentenceTransformer, got {type(model).__name__}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be a bool or a dict of torch.compile keywords, got {type(compile).__name__}")
    first = model[0]
    if not isinstance(first, Transformer):
        raise ValueError(f"accelerate needs a Transformer as first module, got {type(first).__name__}")
    hf = first.model
    if not getattr(type(hf), "is_backend_compatible", lambda: False)():
        raise ValueError(f"{type(hf).__name__} does not route attention through transformers' "
                         "AttentionInterface, so it cannot run on embedkit's attention")
    ek_transformers.register()
    hf.set_attn_implementation(ek_transformers.NAME)
    if hf.config._attn_implementation != ek_transformers.NAME:
        raise ValueError(f"{type(hf).__name__} refused attention implementation '{ek_transformers.NAME}'")
    # sentence-transformers' own flattening is for flash-attn; preprocess must return padded tensors
    # (our packing starts from them), and the fallback path runs padded on the "embedkit" attention.
    first.unpad_inputs = False
    if not isinstance(model, _AcceleratedMixin):
        model.__class__ = _accelerated_class(type(model))
    model._embedkit_max_tokens = max_tokens
    model._embedkit_compile = None if compile is False else ({} if compile is True else dict(compile))
    model.__dict__.pop("_embedkit_compiled", None)  # compiled lazily, on the first packed encode
    return model


class _AcceleratedMixin:
    """Overrides SentenceTransformer._inference (what encode* call after resolving their arguments)."""

    _embedkit_max_tokens: int = DEFAULT_MAX_TOKENS
    _embedkit_compile: dict | None = None  # torch.compile keywords for the packed forward; None: eager

    def __getstate__(self):
        # The compiled forward does not pickle (nor deepcopy): it is rebuilt from the options.
        state = super().__getstate__().copy()
        state.pop("_embedkit_compiled", None)
        return state

    def _inference(self, inputs, *, prompt, batch_size, show_progress_bar, output_value, save_to_cpu,
                   normalize_embeddings, truncate_dim, device=None, **kwargs):
        head = _head_plan(self) if output_value == "sentence_embedding" and inputs else None
        tokens = None
        if head is not None and all(isinstance(x, str) for x in inputs) and _text_forward(self[0]):
            tokens = _tokenize(self, inputs, prompt, kwargs)
        if tokens is None:
            return super()._inference(inputs, prompt=prompt, batch_size=batch_size,
                                      show_progress_bar=show_progress_bar, output_value=output_value,
                                      save_to_cpu=save_to_cpu, normalize_embeddings=normalize_embeddings,
                                      truncate_dim=truncate_dim, device=device, **kwargs)
        device = self._resolve_inference_device(device)
        self.eval()
        with torch.inference_mode():
            out = _encode_packed(self, tokens, head, device, self._embedkit_max_tokens, show_progress_bar,
                                 self._embedkit_compile)
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
        if normalize_embeddings:
            out = torch.nn.functional.normalize(out, p=2, dim=1)
        return out.cpu() if save_to_cpu else out


class AcceleratedSentenceTransformer(_AcceleratedMixin, SentenceTransformer):
    """A SentenceTransformer after `accelerate` (module level, so that it pickles)."""


def _accelerated_class(base: type) -> type:
    if base is SentenceTransformer:
        return AcceleratedSentenceTransformer
    return type(f"Accelerated{base.__name__}", (_AcceleratedMixin, base), {})


# ---- the plan: which modules fuse into pool_project -------------------------------------------

class _Head:
    def __init__(self, mode, include_prompt, dense, normalize, rest):
        self.mode = mode                      # "mean" | "cls" | "lasttoken"
        self.include_prompt = include_prompt
        self.dense = dense                    # Dense fused as pool_project's projection, or None
        self.normalize = normalize            # Normalize fused (the last module)
        self.rest = rest                      # modules applied after, on {"sentence_embedding": x}


def _io_is_sentence_embedding(module) -> bool:
    return (getattr(module, "module_input_name", "sentence_embedding") == "sentence_embedding"
            and getattr(module, "module_output_name", "sentence_embedding") == "sentence_embedding")


def _head_plan(model) -> _Head | None:
    """How Pooling (+ Dense + Normalize) maps onto pool_project, or None if it does not."""
    modules = list(model)[1:]
    if not modules or type(modules[0]) is not Pooling or modules[0].pooling_mode not in _POOL_MODES:
        return None
    pooling, rest = modules[0], modules[1:]
    if any(type(m) not in (Dense, Normalize) or not _io_is_sentence_embedding(m) for m in rest):
        return None
    dense = None
    if rest and type(rest[0]) is Dense and isinstance(rest[0].activation_function, torch.nn.Identity) \
            and not rest[0].use_residual:
        dense, rest = rest[0], rest[1:]
    normalize = len(rest) == 1 and type(rest[0]) is Normalize
    if normalize:
        rest = []
    return _Head(pooling.pooling_mode, pooling.include_prompt, dense, normalize, rest)


def _text_forward(transformer: Transformer) -> bool:
    """The text path calls model.forward and reads last_hidden_state (what the packed call returns)."""
    params = getattr(transformer, "modality_config", {}).get("text")
    if not params or params.get("method") != "forward" or "message" in transformer.modality_config:
        return False
    name = params.get("method_output_name")
    return name in ("last_hidden_state", ("last_hidden_state",), ["last_hidden_state"])


# ---- tokenization: the model's own preprocess, unpadded ---------------------------------------

class _Tokens:
    def __init__(self, ids, token_types, lengths, prompt_length):
        self.ids = ids                      # int64 [N_tokens] (all inputs back to back, input order)
        self.token_types = token_types      # int64 [N_tokens] or None
        self.lengths = lengths              # np.int64 [N]
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.prompt_length = prompt_length


def _tokenize(model, inputs, prompt, kwargs) -> _Tokens | None:
    ids, types, lengths, prompt_length = [], [], [], 0
    for start in range(0, len(inputs), _TOKENIZE_CHUNK):
        features = model.preprocess(inputs[start:start + _TOKENIZE_CHUNK], prompt=prompt, **kwargs)
        if (features.get("modality", "text") != "text" or not set(features) <= _TOKEN_KEYS
                or "input_ids" not in features or "attention_mask" not in features):
            return None
        mask = features["attention_mask"].bool()
        ids.append(features["input_ids"][mask])
        if features.get("token_type_ids") is not None:
            types.append(features["token_type_ids"][mask])
        lengths.append(mask.sum(1))
        prompt_length = int(features.get("prompt_length") or 0)
    token_types = torch.cat(types).long() if types and len(types) == len(ids) else None
    return _Tokens(torch.cat(ids).long(), token_types, torch.cat(lengths).numpy().astype(np.int64),
                   prompt_length)


# ---- the packed encode ------------------------------------------------------------------------

def _packed_forward(hf):
    """The transformer on one packed row -> [T, H] last hidden state (eager)."""
    def forward(model_inputs: dict, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        return hf(**model_inputs, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len,
                  max_length_k=max_len, use_cache=False, return_dict=True).last_hidden_state[0]
    return forward


def _forward(model, compile_options: dict | None):
    """The packed forward of model[0].model: eager, or compiled once per accelerate() call."""
    hf = model[0].model
    if compile_options is None:
        return _packed_forward(hf)
    fn = model.__dict__.get("_embedkit_compiled")
    if fn is None:
        from embedkit._compile import compile_packed

        fn = model.__dict__["_embedkit_compiled"] = compile_packed(_packed_forward(hf), compile_options)
    return fn


def _encode_packed(model, tokens: _Tokens, head: _Head, device, max_tokens: int, progress: bool,
                   compile_options: dict | None = None):
    transformer = model[0]
    hf = transformer.model
    forward = _forward(model, compile_options)
    offset = ek_transformers.position_offset(hf)
    prompt_length = 0 if head.include_prompt else tokens.prompt_length
    batches = token_budget_batches(tokens.lengths, max_tokens)
    from embedkit._progress import Progress

    # Counts inputs, not steps: one token-budget step can hold hundreds of sentences.
    bar = Progress(len(tokens.lengths), "Encoding (packed)", unit="input", enabled=bool(progress))
    out = None
    try:
        for sel in batches:
            out = _encode_step(hf, forward, tokens, head, device, offset, prompt_length, sel, out)
            bar.update(len(sel))
    finally:
        bar.close()
    return out


def _encode_step(hf, forward, tokens: _Tokens, head: _Head, device, offset: int, prompt_length: int, sel, out):
    """One token-budget step: the inputs `sel`, packed, through the model and the fused head."""
    lens = tokens.lengths[sel]
    cu = np.zeros(len(sel) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    total = int(cu[-1])
    # token j of this step: input seq(j), position pos(j); gathered without a per-input loop
    pos = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lens)
    gather = torch.from_numpy(np.repeat(tokens.starts[sel], lens) + pos)
    pos_t = torch.from_numpy(pos)
    model_inputs = {
        "input_ids": tokens.ids[gather][None].to(device, non_blocking=True),
        "position_ids": (pos_t + offset)[None].to(device, non_blocking=True),
    }
    if tokens.token_types is not None and _takes_token_types(hf):
        model_inputs["token_type_ids"] = tokens.token_types[gather][None].to(device, non_blocking=True)
    cu_t = torch.from_numpy(cu.astype(np.int32)).to(device, non_blocking=True)
    max_len = int(lens.max())
    hidden = forward(model_inputs, cu_t, max_len)
    emb = _pool_head(head, hidden, cu_t, pos_t, lens, prompt_length, device)
    if out is None:
        out = emb.new_empty(len(tokens.lengths), emb.shape[1])
    out[torch.from_numpy(np.asarray(sel)).to(device)] = emb
    return out


def _takes_token_types(hf) -> bool:
    """Whether the model's forward names token_type_ids (decoders would just pass it down unused)."""
    return "token_type_ids" in inspect.signature(hf.forward).parameters


def _pool_mask(mode: str, pos: torch.Tensor, lens: np.ndarray, prompt_length: int) -> torch.Tensor | None:
    """[T] bool: the tokens each sequence pools (None = all); follows sentence-transformers' Pooling."""
    if mode == "lasttoken":
        return pos == torch.from_numpy(np.repeat(lens - 1, lens))
    if mode == "cls":  # the first token after the prompt (the first token if nothing follows it)
        first = np.where(lens > prompt_length, prompt_length, 0)
        return pos == torch.from_numpy(np.repeat(first, lens))
    if prompt_length:
        return pos >= prompt_length
    return None


def _pool_head(head: _Head, hidden: torch.Tensor, cu: torch.Tensor, pos: torch.Tensor, lens: np.ndarray,
               prompt_length: int, device) -> torch.Tensor:
    pool_mask = _pool_mask(head.mode, pos, lens, prompt_length)
    # sentence-transformers pools an input whose tokens all belong to the prompt to a zero vector
    empty = np.flatnonzero(lens <= prompt_length) if head.mode == "mean" and prompt_length else np.empty(0)
    if len(empty):
        pool_mask[torch.from_numpy(np.concatenate([[0], np.cumsum(lens)[:-1]])[empty])] = True
    if pool_mask is not None:
        pool_mask = pool_mask.to(device, non_blocking=True)
    dense = head.dense
    if dense is not None and dense.linear.weight.dtype == hidden.dtype and not len(empty):
        # Pooling + Dense (+ Normalize when nothing follows the Dense) as one pool_project
        rest = head.rest
        normalize = head.normalize and not rest
        x = ops.pool_project(hidden, cu, dense.linear.weight, dense.linear.bias, pool_mask=pool_mask,
                             normalize=normalize)
    else:  # pooling alone; the Dense (if any) and Normalize run as sentence-transformers' modules
        rest, normalize = ([dense] if dense is not None else []) + head.rest, False
        x = ops.masked_mean(hidden, cu, pool_mask)
    if len(empty):
        x[torch.from_numpy(empty).to(device)] = 0
    if head.normalize and not normalize:
        rest = rest + [Normalize()]
    features = {"sentence_embedding": x}
    for module in rest:
        features = module(features)
    return features["sentence_embedding"]
