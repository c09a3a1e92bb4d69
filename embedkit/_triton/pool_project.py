"""Fused masked mean-pool + Matryoshka projection: the pooling's Triton kernels and the host launchers.

Forward:  pooled[b] = mean over the pooled tokens t of sequence b of hidden[t]      (Triton, fp32)
          y[b]      = pooled[b] @ weight[:out_dim].T + bias[:out_dim]             (torch GEMM)
          out[b]    = y[b] / max(||y[b]||, 1e-12)  when normalize                   (F.normalize, fp32)
The hidden states are read once (one program per (sequence, H-block)); only the first out_dim rows
of the projection are touched. The projection is a [B, H] x [H, out_dim] GEMM: torch's (cuBLAS on a
GPU) in the weights' dtype with fp32 accumulation; a hand-written Triton GEMM, column sum and
normalize kernel did this before and no GPU benchmark showed them ahead.

Backward: dy = normalize-backward(d_out); d_bias = sum_b dy; d_weight[:out_dim] = dy.T @ pooled;
d_pooled = dy @ weight[:out_dim]; d_hidden[t] = mask[t] * d_pooled[b(t)] / count[b(t)] (Triton). No
[T, out_dim] tensor is ever formed: the [T, H] gradient is a broadcast of the [B, H] one.

Layout: each launcher makes its inputs contiguous where its kernels need it, once (the ops layer
hands over the caller's tensors).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import dot_dtype, gpu_autotune, interpreter_config


@triton.jit
def _chunk_of_sequence(cu_seqlens, seq, T, split, SPLIT):
    """[start, end) of chunk `split` when sequence `seq` is cut into SPLIT equal chunks.

    What is read from cu_seqlens is made safe (free: two scalar loads): entries clamped into
    [0, T], the first sequence starting at 0 and the last ending at T, a decreasing step read as
    an empty sequence. A valid cu_seqlens is unchanged; with validation off a bad one gives wrong
    numbers but no access outside [0, T), and the sequences' ranges [x_b, x_b+1) still cover every
    row of [0, T) (so the backward writes every row of d_hidden).
    """
    n_seq = tl.num_programs(0)
    seq_start = tl.minimum(tl.maximum(tl.load(cu_seqlens + seq), 0), T)
    seq_end = tl.minimum(tl.maximum(tl.load(cu_seqlens + seq + 1), 0), T)
    seq_start = tl.where(seq == 0, 0, seq_start)
    seq_end = tl.where(seq == n_seq - 1, T, seq_end)
    seq_end = tl.maximum(seq_end, seq_start)
    chunk = tl.cdiv(seq_end - seq_start, SPLIT)
    start = seq_start + split * chunk
    return start, tl.minimum(start + chunk, seq_end)


@triton.jit
def _pool_weights(pool_mask, offs_t, t_ok, HAS_MASK: tl.constexpr):
    """1.0 for each in-range token that is pooled, else 0.0."""
    if HAS_MASK:
        return tl.load(pool_mask + offs_t, mask=t_ok, other=0).to(tl.float32)
    return t_ok.to(tl.float32)


_MEAN_CONFIGS = [triton.Config({"BLOCK_T": bt, "BLOCK_H": bh}, num_warps=w)
                 for bt, bh, w in ((16, 128, 4), (32, 128, 4), (32, 256, 8), (64, 64, 4), (16, 256, 4))]


@gpu_autotune(_MEAN_CONFIGS, key=["H", "SPLIT", "HAS_MASK"])
@triton.jit
def _masked_mean_kernel(hidden, stride_ht, cu_seqlens, pool_mask, out, counts, T, H, SPLIT,
                        HAS_MASK: tl.constexpr, FINAL: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """Program (seq, hblock, split) sums the pooled tokens of chunk `split` of sequence `seq`.

    FINAL (SPLIT == 1): writes the mean to out [B, H] and the count to counts [B] (fp32). Otherwise
    writes fp32 partial sums to out [SPLIT, B, H] and int32 partial counts to counts [SPLIT, B],
    reduced in a fixed order by _masked_mean_reduce_kernel (deterministic, no atomics). Token counts
    are integers (an fp32 count saturates at 2^24).
    """
    seq = tl.program_id(0)
    hblock = tl.program_id(1)
    split = tl.program_id(2)
    n_seq = tl.num_programs(0)
    start, end = _chunk_of_sequence(cu_seqlens, seq, T, split, SPLIT)
    offs_h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    # A 2-D accumulator keeps BLOCK_T independent fp32 sums in flight; reduced once at the end.
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    n = tl.zeros([BLOCK_T], dtype=tl.int32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < end
        w = _pool_weights(pool_mask, offs_t, t_ok, HAS_MASK)
        x = tl.load(hidden + offs_t[:, None].to(tl.int64) * stride_ht + offs_h[None, :],
                    mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        acc += x * w[:, None]
        n += w.to(tl.int32)
    total = tl.sum(acc, axis=0)
    count = tl.sum(n, axis=0)
    row = split.to(tl.int64) * n_seq + seq
    if FINAL:
        total = total / count.to(tl.float32)
    tl.store(out + row * H + offs_h, total, mask=h_ok)
    if hblock == 0:
        tl.store(counts + row, count.to(counts.dtype.element_ty))


@triton.jit
def _masked_mean_reduce_kernel(partial, partial_counts, out, counts, B, H, SPLIT, BLOCK_H: tl.constexpr):
    seq = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    count = tl.load(partial_counts + seq)
    total += tl.load(partial + seq.to(tl.int64) * H + offs_h, mask=h_ok, other=0.0)
    for s in range(1, SPLIT):
        row = s * B + seq
        total += tl.load(partial + row.to(tl.int64) * H + offs_h, mask=h_ok, other=0.0)
        count += tl.load(partial_counts + row)  # int32 partial counts: exact
    tl.store(out + seq.to(tl.int64) * H + offs_h, total / count.to(tl.float32), mask=h_ok)
    if tl.program_id(1) == 0:
        tl.store(counts + seq, count.to(tl.float32))


@gpu_autotune(_MEAN_CONFIGS, key=["H", "SPLIT", "HAS_MASK"])
@triton.jit
def _masked_mean_bwd_kernel(d_pooled, counts, cu_seqlens, pool_mask, d_hidden, stride_dt, T, H, SPLIT,
                            HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """d_hidden[t] = mask[t] * d_pooled[seq] / count[seq] over chunk `split` of sequence `seq`.
    Every row of d_hidden [T, H] is written, whatever cu_seqlens holds (see _chunk_of_sequence)."""
    seq = tl.program_id(0)
    hblock = tl.program_id(1)
    split = tl.program_id(2)
    start, end = _chunk_of_sequence(cu_seqlens, seq, T, split, SPLIT)
    offs_h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    g = tl.load(d_pooled + seq.to(tl.int64) * H + offs_h, mask=h_ok, other=0.0) / tl.load(counts + seq)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < end
        w = _pool_weights(pool_mask, offs_t, t_ok, HAS_MASK)
        tl.store(d_hidden + offs_t[:, None].to(tl.int64) * stride_dt + offs_h[None, :],
                 (w[:, None] * g[None, :]).to(d_hidden.dtype.element_ty),
                 mask=t_ok[:, None] & h_ok[None, :])


# ---- host launchers ---------------------------------------------------------------------------

_INTERPRET_MEAN_BLOCKS = {"BLOCK_T": 32, "BLOCK_H": 64}


def _mean_launch(kernel, grid_fn, *args, **kw):
    """Launch a pooling kernel on grid_fn(config): autotuned blocks on a GPU, fixed ones under the interpreter."""
    kernel[grid_fn](*args, **kw, **interpreter_config(_INTERPRET_MEAN_BLOCKS))


def token_splits(T: int, B: int, H: int, device: torch.device) -> int:
    """How many chunks to cut each sequence into so that the (sequence, H-block) grid fills the GPU:
    a batch of a few long sequences would otherwise leave most SMs idle. Decided from host-side
    sizes only (no sync): assumes lengths near the mean T / B."""
    if device.type != "cuda" or B == 0:
        return 1
    programs = B * triton.cdiv(H, 128)
    want = triton.cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, programs)
    return int(max(1, min(want, T // max(1, B) // 256, 64)))


def _pool_layout(cu_seqlens: torch.Tensor, pool_mask: torch.Tensor | None):
    """(cu_seqlens, the pool-mask argument, HAS_MASK): contiguous, as the kernels index them with stride 1;
    without a mask the kernels get cu_seqlens as a never-read placeholder pointer."""
    cu_seqlens = cu_seqlens.contiguous()
    if pool_mask is None:
        return cu_seqlens, cu_seqlens, False
    return cu_seqlens, pool_mask.contiguous().view(torch.uint8), True


def masked_mean_fwd(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_mask: torch.Tensor | None,
                    splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled fp32 [B, H], counts fp32 [B]): the mean of the pooled tokens of each sequence."""
    T, H = hidden.shape
    B = cu_seqlens.numel() - 1
    dev = hidden.device
    if hidden.stride(1) != 1:  # rows may be strided, columns not
        hidden = hidden.contiguous()
    splits = token_splits(T, B, H, dev) if splits is None else splits
    cu_seqlens, mask_arg, has_mask = _pool_layout(cu_seqlens, pool_mask)
    pooled = torch.empty(B, H, dtype=torch.float32, device=dev)
    counts = torch.empty(B, dtype=torch.float32, device=dev)
    if splits == 1:
        out, out_counts = pooled, counts
    else:
        out = torch.empty(splits, B, H, dtype=torch.float32, device=dev)
        out_counts = torch.empty(splits, B, dtype=torch.int32, device=dev)
    _mean_launch(_masked_mean_kernel, lambda meta: (B, triton.cdiv(H, meta["BLOCK_H"]), splits),
                 hidden, hidden.stride(0), cu_seqlens, mask_arg, out, out_counts, T, H, splits,
                 HAS_MASK=has_mask, FINAL=splits == 1)
    if splits > 1:
        block_h = min(1024, max(16, triton.next_power_of_2(H)))
        _masked_mean_reduce_kernel[(B, triton.cdiv(H, block_h))](out, out_counts, pooled, counts, B, H, splits,
                                                                 BLOCK_H=block_h)
    return pooled, counts


def pool_project_fwd(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, pool_mask: torch.Tensor | None, out_dim: int,
                     normalize: bool, splits: int | None = None):
    """Returns (out [B, out_dim] in hidden's dtype, pooled fp32 [B, H], counts fp32 [B],
    y fp32 [B, out_dim] (pre-normalization; empty unless normalize), inv_norm fp32 [B] (same)).

    The projection's operands are cast to dot_dtype (fp32 accumulation), the normalization is fp32."""
    pooled, counts = masked_mean_fwd(hidden, cu_seqlens, pool_mask, splits)
    dot = dot_dtype(weight.dtype)
    y = F.linear(pooled.to(dot), weight[:out_dim].to(dot), None if bias is None else bias[:out_dim].to(dot))
    if not normalize:
        return y.to(hidden.dtype), pooled, counts, pooled.new_empty(0), pooled.new_empty(0)
    y = y.float()
    inv_norm = 1.0 / torch.linalg.vector_norm(y, dim=1).clamp_min(_NORM_EPS)
    return F.normalize(y, dim=1, eps=_NORM_EPS).to(hidden.dtype), pooled, counts, y, inv_norm


_NORM_EPS = 1e-12  # F.normalize's: ||y|| is clamped at 1e-12


def _normalize_bwd(g: torch.Tensor, y: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """The gradient through out = F.normalize(y): (g - yhat <g, yhat>) / ||y||, yhat = y / ||y||; where
    ||y|| is clamped the clamp's gradient is 0, so it is g / 1e-12 there. fp32."""
    inv = inv_norm[:, None]
    yhat = y * inv
    clamped = (y * y).sum(1, keepdim=True) <= _NORM_EPS * _NORM_EPS
    return torch.where(clamped, g, g - yhat * (g * yhat).sum(1, keepdim=True)) * inv


def pool_project_bwd(grad_out: torch.Tensor, pooled: torch.Tensor, counts: torch.Tensor,
                     y: torch.Tensor, inv_norm: torch.Tensor, hidden_shape: tuple[int, int],
                     hidden_dtype: torch.dtype, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                     has_bias: bool, pool_mask: torch.Tensor | None, normalize: bool,
                     splits: int | None = None):
    """Returns (d_hidden [T, H], d_weight [D_out, H], d_bias [D_out] or None).

    The GEMMs' operands are cast to dot_dtype (fp32 accumulation), d_bias is summed in fp32."""
    T, H = hidden_shape
    B, out_dim = grad_out.shape
    dev = grad_out.device
    dy = _normalize_bwd(grad_out.float(), y, inv_norm) if normalize else grad_out
    dot = dot_dtype(weight.dtype)
    dy_op = dy.to(dot)
    d_weight = torch.zeros_like(weight)
    d_weight[:out_dim] = dy_op.t() @ pooled.to(dot)
    d_bias = None
    if has_bias:
        d_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=dev)
        d_bias[:out_dim] = dy.sum(0, dtype=torch.float32)
    d_pooled = dy_op @ weight[:out_dim].to(dot)
    d_hidden = torch.empty(T, H, dtype=hidden_dtype, device=dev)
    splits = token_splits(T, B, H, dev) if splits is None else splits
    cu_seqlens, mask_arg, has_mask = _pool_layout(cu_seqlens, pool_mask)
    _mean_launch(_masked_mean_bwd_kernel, lambda meta: (B, triton.cdiv(H, meta["BLOCK_H"]), splits),
                 d_pooled, counts, cu_seqlens, mask_arg, d_hidden, d_hidden.stride(0), T, H, splits,
                 HAS_MASK=has_mask)
    return d_hidden, d_weight, d_bias
