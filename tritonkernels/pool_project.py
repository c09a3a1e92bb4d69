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

from ._dtypes import DOT_BF16, DOT_FP16, DOT_FP32, dot_code, next_pow2


@triton.jit
def _masked_mean_kernel(hidden, stride_ht, cu_seqlens, pool_mask, pooled, counts, H,
                        HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    seq = tl.program_id(0)
    hblock = tl.program_id(1)
    start = tl.load(cu_seqlens + seq)
    end = tl.load(cu_seqlens + seq + 1)
    offs_h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    # A 2-D accumulator keeps BLOCK_T independent fp32 sums in flight; reduced once at the end.
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    n = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < end
        if HAS_MASK:
            w = tl.load(pool_mask + offs_t, mask=t_ok, other=0).to(tl.float32)
        else:
            w = t_ok.to(tl.float32)
        x = tl.load(hidden + offs_t[:, None].to(tl.int64) * stride_ht + offs_h[None, :],
                    mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        acc += x * w[:, None]
        n += w
    count = tl.sum(n, axis=0)
    tl.store(pooled + seq.to(tl.int64) * H + offs_h, tl.sum(acc, axis=0) / count, mask=h_ok)
    if hblock == 0:
        tl.store(counts + seq, count)


@triton.jit
def _matmul_kernel(a, b, c, bias, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[M, N] = a[M, K] @ b[K, N] (+ bias[N]); operands cast to the DOT dtype, fp32 accumulation."""
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
        a_tile = tl.load(a + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_tile = tl.load(b + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT == 1:
            acc += tl.dot(a_tile.to(tl.float16), b_tile.to(tl.float16))
        elif DOT == 2:
            acc += tl.dot(a_tile.to(tl.bfloat16), b_tile.to(tl.bfloat16))
        else:
            acc += tl.dot(a_tile.to(tl.float32), b_tile.to(tl.float32), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn,
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


@triton.jit
def _masked_mean_bwd_kernel(d_pooled, counts, cu_seqlens, pool_mask, d_hidden, stride_dt, H,
                            HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    seq = tl.program_id(0)
    hblock = tl.program_id(1)
    start = tl.load(cu_seqlens + seq)
    end = tl.load(cu_seqlens + seq + 1)
    offs_h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    g = tl.load(d_pooled + seq.to(tl.int64) * H + offs_h, mask=h_ok, other=0.0) / tl.load(counts + seq)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < end
        if HAS_MASK:
            w = tl.load(pool_mask + offs_t, mask=t_ok, other=0).to(tl.float32)
        else:
            w = t_ok.to(tl.float32)
        tl.store(d_hidden + offs_t[:, None].to(tl.int64) * stride_dt + offs_h[None, :],
                 (w[:, None] * g[None, :]).to(d_hidden.dtype.element_ty),
                 mask=t_ok[:, None] & h_ok[None, :])


# ---- host launchers ---------------------------------------------------------------------------

def _mean_blocks(H: int) -> tuple[int, int]:
    block_h = min(128, next_pow2(H))
    return 32, max(16, block_h)


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, dot: int) -> None:
    """c = a @ b (+ bias) for 2-D strided views; c may be a row-slice of a larger tensor."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    block_m = 64 if M >= 64 else max(16, next_pow2(M))
    block_n = 64 if N >= 64 else max(16, next_pow2(N))
    block_k = 32 if dot == DOT_FP32 else 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _matmul_kernel[grid](a, b, c, bias if bias is not None else c, M, N, K,
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                         HAS_BIAS=bias is not None, DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def masked_mean_fwd(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_mask: torch.Tensor | None):
    """The pooling half alone: (pooled fp32 [B, H], counts fp32 [B]) of hidden [T, H]."""
    T, H = hidden.shape
    B = cu_seqlens.numel() - 1
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    pooled = torch.empty(B, H, dtype=torch.float32, device=hidden.device)
    counts = torch.empty(B, dtype=torch.float32, device=hidden.device)
    mask_u8 = pool_mask.view(torch.uint8) if pool_mask is not None else None
    block_t, block_h = _mean_blocks(H)
    _masked_mean_kernel[(B, triton.cdiv(H, block_h))](
        hidden, hidden.stride(0), cu_seqlens, mask_u8 if mask_u8 is not None else cu_seqlens,
        pooled, counts, H, HAS_MASK=mask_u8 is not None, BLOCK_T=block_t, BLOCK_H=block_h)
    return pooled, counts


def pool_project_fwd(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, pool_mask: torch.Tensor | None, out_dim: int,
                     normalize: bool):
    """Returns (out [B, out_dim] in hidden's dtype, pooled fp32 [B, H], counts fp32 [B],
    y fp32 [B, out_dim] (pre-normalization; empty unless normalize), inv_norm fp32 [B] (same))."""
    T, H = hidden.shape
    B = cu_seqlens.numel() - 1
    dev = hidden.device
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    pooled = torch.empty(B, H, dtype=torch.float32, device=dev)
    counts = torch.empty(B, dtype=torch.float32, device=dev)
    mask_u8 = pool_mask.view(torch.uint8) if pool_mask is not None else None
    block_t, block_h = _mean_blocks(H)
    _masked_mean_kernel[(B, triton.cdiv(H, block_h))](
        hidden, hidden.stride(0), cu_seqlens, mask_u8 if mask_u8 is not None else cu_seqlens,
        pooled, counts, H, HAS_MASK=mask_u8 is not None, BLOCK_T=block_t, BLOCK_H=block_h)
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
                     has_bias: bool, pool_mask: torch.Tensor | None, normalize: bool):
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
    mask_u8 = pool_mask.view(torch.uint8) if pool_mask is not None else None
    block_t, block_h = _mean_blocks(H)
    _masked_mean_bwd_kernel[(B, triton.cdiv(H, block_h))](
        d_pooled, counts, cu_seqlens, mask_u8 if mask_u8 is not None else cu_seqlens, d_hidden,
        d_hidden.stride(0), H, HAS_MASK=mask_u8 is not None, BLOCK_T=block_t, BLOCK_H=block_h)
    return d_hidden, d_weight, d_bias
