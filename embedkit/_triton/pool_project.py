"""Fused masked mean-pool + Matryoshka projection: Triton kernels and host launchers.

Forward:  pooled[b] = mean over the pooled tokens t of sequence b of hidden[t]      (fp32)
          y[b]      = pooled[b] @ weight[:out_dim].T + bias[:out_dim]             (fp32 acc)
          out[b]    = y[b] / ||y[b]||  when normalize
The hidden states are read once (one program per (sequence, H-block)); only the first out_dim rows
of the projection are touched.

Backward: dy = normalize-backward(d_out); d_bias = sum_b dy; d_weight[:out_dim] = dy.T @ pooled;
d_pooled = dy @ weight[:out_dim]; d_hidden[t] = mask[t] * d_pooled[b(t)] / count[b(t)]. No
[T, out_dim] tensor is ever formed: the [T, H] gradient is a broadcast of the [B, H] one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._dtypes import dot_code, next_pow2


def _gpu_autotune(configs, key):
    """triton.autotune on a GPU; under the interpreter one fixed config (tuning there is meaningless)."""
    def wrap(fn):
        return fn if INTERPRET else triton.autotune(configs=configs, key=key)(fn)
    return wrap


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


@_gpu_autotune(_MEAN_CONFIGS, key=["H", "SPLIT", "HAS_MASK"])
@triton.jit
def _masked_mean_kernel(hidden, stride_ht, cu_seqlens, pool_mask, out, counts, T, H, SPLIT,
                        HAS_MASK: tl.constexpr, FINAL: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """Program (seq, hblock, split) sums the pooled tokens of chunk `split` of sequence `seq`.

    FINAL (SPLIT == 1): writes the mean to out [B, H] and the count to counts [B] (fp32). Otherwise
    writes fp32 partial sums to out [SPLIT, B, H] and int32 partial counts to counts [SPLIT, B],
    reduced in a fixed order by _reduce_partials_kernel (deterministic, no atomics). Token counts
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
def _reduce_partials_kernel(partial, partial_counts, out, counts, B, H, SPLIT, BLOCK_H: tl.constexpr):
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


_MATMUL_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
                   for m, n, k, w, st in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                          (64, 64, 64, 4, 4), (32, 64, 32, 4, 4), (128, 128, 32, 8, 4))]


@_gpu_autotune(_MATMUL_CONFIGS, key=["M", "N", "K", "DOT"])
@triton.jit
def _matmul_kernel(a, b, c, bias, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[M, N] = a[M, K] @ b[K, N] (+ bias[N]); operands cast to the DOT dtype, fp32 accumulation.

    Every offset is int64: for d_weight, a = dy.t() has stride_ak = out_dim, and offs_k * out_dim
    passes 2^31 at B >= 699,051 rows of out_dim 3,072."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a_tile = tl.load(a + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_tile = tl.load(b + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT == 1:
            acc += tl.dot(a_tile.to(tl.float16), b_tile.to(tl.float16))
        elif DOT == 2:
            acc += tl.dot(a_tile.to(tl.bfloat16), b_tile.to(tl.bfloat16))
        else:
            acc += tl.dot(a_tile.to(tl.float32), b_tile.to(tl.float32), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn,
             acc.to(c.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _l2_normalize_kernel(y, out, inv_norm, N, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    ok = offs < N
    v = tl.load(y + row.to(tl.int64) * N + offs, mask=ok, other=0.0)
    # F.normalize's eps: ||y|| is clamped at 1e-12.
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), 1e-12)
    tl.store(out + row.to(tl.int64) * N + offs, (v * inv).to(out.dtype.element_ty), mask=ok)
    tl.store(inv_norm + row, inv)


@triton.jit
def _l2_normalize_bwd_kernel(grad_out, stride_g, y, inv_norm, dy, N, BLOCK_N: tl.constexpr):
    """dy = (g - yhat * <g, yhat>) / ||y||, with yhat = y / ||y|| (the clamp's gradient is 0)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    ok = offs < N
    g = tl.load(grad_out + row.to(tl.int64) * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
    inv = tl.load(inv_norm + row)
    v = tl.load(y + row.to(tl.int64) * N + offs, mask=ok, other=0.0)
    yhat = v * inv
    if tl.sum(v * v, axis=0) > 1e-24:
        d = (g - yhat * tl.sum(g * yhat, axis=0)) * inv
    else:
        d = g * inv
    tl.store(dy + row.to(tl.int64) * N + offs, d, mask=ok)


@triton.jit
def _column_sum_kernel(x, stride_x, out, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        acc += tl.load(x + offs_m[:, None].to(tl.int64) * stride_x + offs_n[None, :],
                       mask=(offs_m < M)[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out + offs_n, tl.sum(acc, axis=0).to(out.dtype.element_ty), mask=n_ok)


@_gpu_autotune(_MEAN_CONFIGS, key=["H", "SPLIT", "HAS_MASK"])
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
    """Launch a pooling kernel: autotuned blocks on GPU, fixed blocks under the interpreter."""
    if INTERPRET:
        kernel[grid_fn(_INTERPRET_MEAN_BLOCKS)](*args, **kw, **_INTERPRET_MEAN_BLOCKS)
    else:
        kernel[grid_fn](*args, **kw)


def token_splits(T: int, B: int, H: int, device: torch.device) -> int:
    """How many chunks to cut each sequence into so that the (sequence, H-block) grid fills the GPU:
    a batch of a few long sequences would otherwise leave most SMs idle. Decided from host-side
    sizes only (no sync): assumes lengths near the mean T / B."""
    if device.type != "cuda" or B == 0:
        return 1
    programs = B * triton.cdiv(H, 128)
    want = triton.cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, programs)
    return int(max(1, min(want, T // max(1, B) // 256, 64)))


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, dot: int) -> None:
    """c = a @ b (+ bias) for 2-D strided views; c may be a row-slice of a larger tensor."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    args = (a, b, c, bias if bias is not None else c, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    if INTERPRET:
        blocks = {"BLOCK_M": min(64, max(16, next_pow2(M))), "BLOCK_N": min(64, max(16, next_pow2(N))),
                  "BLOCK_K": 32}
        grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"]))
        _matmul_kernel[grid](*args, HAS_BIAS=bias is not None, DOT=dot, **blocks)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _matmul_kernel[grid](*args, HAS_BIAS=bias is not None, DOT=dot)


def masked_mean_fwd(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_mask: torch.Tensor | None,
                    splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled fp32 [B, H], counts fp32 [B]): the mean of the pooled tokens of each sequence."""
    T, H = hidden.shape
    B = cu_seqlens.numel() - 1
    dev = hidden.device
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    splits = token_splits(T, B, H, dev) if splits is None else splits
    cu_seqlens = cu_seqlens.contiguous()  # the kernels index it with stride 1
    pool_mask = None if pool_mask is None else pool_mask.contiguous()
    pooled = torch.empty(B, H, dtype=torch.float32, device=dev)
    counts = torch.empty(B, dtype=torch.float32, device=dev)
    mask_arg = pool_mask.view(torch.uint8) if pool_mask is not None else cu_seqlens
    if splits == 1:
        out, out_counts = pooled, counts
    else:
        out = torch.empty(splits, B, H, dtype=torch.float32, device=dev)
        out_counts = torch.empty(splits, B, dtype=torch.int32, device=dev)
    _mean_launch(_masked_mean_kernel, lambda meta: (B, triton.cdiv(H, meta["BLOCK_H"]), splits),
                 hidden, hidden.stride(0), cu_seqlens, mask_arg, out, out_counts, T, H, splits,
                 HAS_MASK=pool_mask is not None, FINAL=splits == 1)
    if splits > 1:
        block_h = min(1024, max(16, next_pow2(H)))
        _reduce_partials_kernel[(B, triton.cdiv(H, block_h))](out, out_counts, pooled, counts, B, H, splits,
                                                              BLOCK_H=block_h)
    return pooled, counts


def pool_project_fwd(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, pool_mask: torch.Tensor | None, out_dim: int,
                     normalize: bool, splits: int | None = None):
    """Returns (out [B, out_dim] in hidden's dtype, pooled fp32 [B, H], counts fp32 [B],
    y fp32 [B, out_dim] (pre-normalization; empty unless normalize), inv_norm fp32 [B] (same))."""
    B = cu_seqlens.numel() - 1
    dev = hidden.device
    pooled, counts = masked_mean_fwd(hidden, cu_seqlens, pool_mask, splits)
    w = weight[:out_dim]
    b = bias[:out_dim] if bias is not None else None
    out = torch.empty(B, out_dim, dtype=hidden.dtype, device=dev)
    dot = dot_code(hidden.dtype)
    if normalize:
        y = torch.empty(B, out_dim, dtype=torch.float32, device=dev)
        inv_norm = torch.empty(B, dtype=torch.float32, device=dev)
        _matmul(pooled, w.t(), y, b, dot)
        _l2_normalize_kernel[(B,)](y, out, inv_norm, out_dim, BLOCK_N=max(16, next_pow2(out_dim)))
    else:
        y = pooled.new_empty(0)
        inv_norm = pooled.new_empty(0)
        _matmul(pooled, w.t(), out, b, dot)
    return out, pooled, counts, y, inv_norm


def pool_project_bwd(grad_out: torch.Tensor, pooled: torch.Tensor, counts: torch.Tensor,
                     y: torch.Tensor, inv_norm: torch.Tensor, hidden_shape: tuple[int, int],
                     hidden_dtype: torch.dtype, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                     has_bias: bool, pool_mask: torch.Tensor | None, normalize: bool,
                     splits: int | None = None):
    """Returns (d_hidden [T, H], d_weight [D_out, H], d_bias [D_out] or None)."""
    T, H = hidden_shape
    B, out_dim = grad_out.shape
    dev = grad_out.device
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    if normalize:
        dy = torch.empty(B, out_dim, dtype=torch.float32, device=dev)
        _l2_normalize_bwd_kernel[(B,)](grad_out, grad_out.stride(0), y, inv_norm, dy, out_dim,
                                       BLOCK_N=max(16, next_pow2(out_dim)))
    else:
        dy = grad_out
    dot = dot_code(weight.dtype)
    d_weight = torch.zeros_like(weight)
    _matmul(dy.t(), pooled, d_weight[:out_dim], None, dot)
    d_bias = None
    if has_bias:
        d_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=dev)
        block_n = min(128, max(16, next_pow2(out_dim)))
        _column_sum_kernel[(triton.cdiv(out_dim, block_n),)](dy, dy.stride(0), d_bias, B, out_dim,
                                                             BLOCK_M=16, BLOCK_N=block_n)
    d_pooled = torch.empty(B, H, dtype=torch.float32, device=dev)
    _matmul(dy, weight[:out_dim], d_pooled, None, dot)
    d_hidden = torch.empty(T, H, dtype=hidden_dtype, device=dev)
    splits = token_splits(T, B, H, dev) if splits is None else splits
    cu_seqlens = cu_seqlens.contiguous()
    pool_mask = None if pool_mask is None else pool_mask.contiguous()
    mask_arg = pool_mask.view(torch.uint8) if pool_mask is not None else cu_seqlens
    _mean_launch(_masked_mean_bwd_kernel, lambda meta: (B, triton.cdiv(H, meta["BLOCK_H"]), splits),
                 d_pooled, counts, cu_seqlens, mask_arg, d_hidden, d_hidden.stride(0), T, H, splits,
                 HAS_MASK=pool_mask is not None)
    return d_hidden, d_weight, d_bias
