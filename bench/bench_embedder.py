"""embedder: end-to-end tokens/s of the multimodal Embedder on a packed batch of images + text + audio.

Forward and forward+backward of the same model (same weights, same inputs) two ways:
- "embedkit": packed varlen attention and fused pool_project through embedkit.ops (the backend
  "auto" picks: Triton kernels on a GPU);
- "torch-padded-sdpa": the usual torch way -- every sequence padded to the longest, attention
  through torch's scaled_dot_product_attention with a key-padding mask (k / v repeated for GQA,
  rotary applied in torch), and an unfused padded mean-pool -> linear -> normalize.

On a GPU the model is a ~0.5B config (Qwen2-0.5B shape) in bf16; on CPU the tiny config only, in
fp32 (CPU figures say nothing about the GPU ones). FLOPs: 2 x matmul parameters per token plus
4 * len^2 * heads * head_dim per sequence and layer for attention (backward: 2x / 2.5x of those).
Each record has tokens_per_s; embedkit's row has speedup_vs_torch-padded-sdpa = the padded torch
model's time / embedkit's time in the same case and pass (bench/harness.py's definition: > 1 means
embedkit is that much faster).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

import embedkit
from embedkit.ops import _dispatch, reference

from .harness import BenchRun

OP = "embedder"


def _items(n: int, image_side: int, text_len: int, audio_s: float, seed: int = 0):
    g = np.random.default_rng(seed)
    words = "the a photo of cat dog street music speech river mountain city night".split()
    out = []
    for i in range(n):
        text = " ".join(g.choice(words, size=text_len // 5))[:text_len]
        img = g.integers(0, 256, (image_side, image_side + 16 * (i % 3), 3), dtype=np.uint8)
        wave = (0.1 * g.standard_normal(int(16000 * audio_s))).astype(np.float32)
        out.append(embedkit.Interleaved([embedkit.Text(text), embedkit.Image(img), embedkit.Audio(wave, 16000)]))
    return out


# ---- the padded torch baseline, swapped in for the embedkit ops --------------------------------

class _PaddedOps:
    """varlen_attention / pool_project with padded torch ops; pad indices are cached per cu_seqlens."""

    def __init__(self):
        self._cache: dict = {}

    def _layout(self, cu, max_seqlen):
        key = (cu.data_ptr(), int(max_seqlen))
        if key not in self._cache:
            batch = embedkit.PackedBatch(cu, max_seqlen)
            self._cache[key] = (batch, batch.attention_mask())
        return self._cache[key]

    def attention(self, q, k, v, cu_seqlens, max_seqlen, *, causal=False, softmax_scale=None, rotary=None,
                  return_lse=False):
        batch, mask = self._layout(cu_seqlens, max_seqlen)
        if rotary is not None:
            q, k = reference.apply_rotary(q, *rotary), reference.apply_rotary(k, *rotary)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        qp, kp, vp = (batch.pad(t).transpose(1, 2) for t in (q, k, v))   # [B, H, L, D]
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:, None, None, :], scale=softmax_scale)
        return batch.unpad(out.transpose(1, 2))

    def pool_project(self, hidden, cu_seqlens, weight, bias=None, *, pool_mask=None, out_dim=None,
                     normalize=False):
        batch, mask = self._layout(cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
        hp = batch.pad(hidden)
        m = batch.pad(pool_mask.to(hidden.dtype))[..., None] if pool_mask is not None else mask[..., None].to(
            hidden.dtype)
        pooled = (hp * m).sum(1) / m.sum(1)
        out_dim = weight.shape[0] if out_dim is None else out_dim
        out = F.linear(pooled, weight[:out_dim], None if bias is None else bias[:out_dim])
        return F.normalize(out, dim=-1) if normalize else out


@contextlib.contextmanager
def padded_torch_ops():
    """Inside the block, the model's embedkit.ops.varlen_attention / pool_project are the padded ones."""
    impl = _PaddedOps()
    saved = embedkit.ops.varlen_attention, embedkit.ops.pool_project
    embedkit.ops.varlen_attention, embedkit.ops.pool_project = impl.attention, impl.pool_project
    try:
        yield
    finally:
        embedkit.ops.varlen_attention, embedkit.ops.pool_project = saved


def _flops(cfg, inp) -> tuple[float, float]:
    """(forward, backward) FLOPs of the backbone on these inputs."""
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    per_layer = H * cfg.num_heads * D * 2 + 2 * H * cfg.num_kv_heads * D + (3 if cfg.mlp_gated else 2) * H * I
    T = inp.num_tokens
    lengths = (inp.batch.cu_seqlens[1:] - inp.batch.cu_seqlens[:-1]).double()
    mm = 2.0 * T * per_layer * cfg.num_layers
    if inp.vision_patches is not None:
        mm += 2.0 * inp.vision_patches.shape[0] * cfg.vision_patch_dim * H
    attn = 4.0 * float((lengths ** 2).sum()) * cfg.num_heads * D * cfg.num_layers
    return mm + attn, 2.0 * mm + 2.5 * attn


def run(bench: BenchRun) -> None:
    dev = bench.device
    if bench.on_gpu:
        cfg = embedkit.EmbedderConfig.base_0p5b()
        dtype = torch.bfloat16
        shapes = [(4, 448, 256, 4.0)] if bench.quick else [(4, 448, 256, 4.0), (16, 448, 256, 4.0),
                                                           (16, 224, 1024, 10.0)]
    else:
        cfg = embedkit.EmbedderConfig.tiny()
        dtype = torch.float32
        shapes = [(4, 32, 64, 0.5)] if bench.quick else [(4, 32, 64, 0.5), (8, 64, 256, 1.0)]
        bench.note("embedder on CPU: the tiny config only (the ~0.5B figures need a GPU)")
    torch.manual_seed(0)
    model = embedkit.Embedder(cfg).to(device=dev, dtype=dtype)
    params = model.num_parameters()
    weight_bytes = float(sum(p.numel() * p.element_size() for p in model.parameters()))
    backends = {op: _dispatch.resolve(op, dev) for op in ("varlen_attention", "pool_project")}
    for n, side, text_len, audio_s in shapes:
        inp = model.processor(_items(n, side, text_len, audio_s)).to(dev, dtype)
        T = inp.num_tokens
        f_fwd, f_bwd = _flops(cfg, inp)
        case = {"params_M": round(params / 1e6), "B": n, "T": T, "image": side, "text": text_len,
                "audio_s": audio_s, "dtype": str(dtype)[6:]}
        for impl in ("embedkit", "torch-padded-sdpa"):
            ctx = contextlib.nullcontext if impl == "embedkit" else padded_torch_ops

            def fwd():
                with ctx(), torch.no_grad():
                    return model(inp, dim=768, normalize=True)

            def fwd_bwd():
                with ctx():
                    model(inp, normalize=True).float().sum().backward()
                model.zero_grad(set_to_none=True)

            try:
                ms_f = bench.time_ms(fwd)
                ms_fb = bench.time_ms(fwd_bwd)
            except torch.OutOfMemoryError:
                bench.note(f"{impl} ran out of memory at T={T}")
                torch.cuda.empty_cache()
                continue
            extra = {"backends": backends} if impl == "embedkit" else {}
            for name, ms, flops in (("fwd", ms_f, f_fwd), ("fwd+bwd", ms_fb, f_fwd + f_bwd)):
                # byte floor: the weights read once (forward), or read twice and their gradients written
                floor_bytes = weight_bytes * (1 if name == "fwd" else 3)
                bench.record(OP, {**case, "pass": name}, impl, ms=ms, flops=flops, floor_bytes=floor_bytes,
                             tokens_per_s=T / (ms * 1e-3), **extra)
        for name in ("fwd", "fwd+bwd"):
            bench.add_speedups(OP, {**case, "pass": name}, baselines=["torch-padded-sdpa"], of=["embedkit"])
