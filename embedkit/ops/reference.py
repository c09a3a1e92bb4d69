"""Pure-torch oracles of every embedkit op. Any device, any float dtype, differentiable by autograd.

These define what the kernels compute; the tests hold every backend against them. Accumulations
run in fp32 (fp64 for fp64 inputs), like the kernels; results are rounded to the input dtype where
the equivalent torch composition would round them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """int64 [T]: the index of the sequence each packed token belongs to (no host sync)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(batch, lengths, output_size=total_tokens)


def masked_mean(hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                pool_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H] mean of the pooled tokens of each sequence, accumulated in fp32, in hidden's dtype."""
    total, width = hidden.shape
    batch = cu_seqlens.numel() - 1
    acc = _acc_dtype(hidden.dtype)
    seg = segment_ids(cu_seqlens, total)
    weight = (torch.ones(total, dtype=acc, device=hidden.device) if pool_mask is None
              else pool_mask.to(acc))
    sums = torch.zeros(batch, width, dtype=acc, device=hidden.device)
    sums = sums.index_add(0, seg, hidden.to(acc) * weight[:, None])
    counts = torch.zeros(batch, dtype=acc, device=hidden.device).index_add(0, seg, weight)
    return (sums / counts[:, None]).to(hidden.dtype)


def pool_project(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, *, pool_mask: torch.Tensor | None = None,
                 out_dim: int | None = None, normalize: bool = False) -> torch.Tensor:
    """Masked mean-pool per sequence, then the first out_dim rows of a linear projection."""
    out_dim = weight.shape[0] if out_dim is None else out_dim
    pooled = masked_mean(hidden, cu_seqlens, pool_mask)
    out = F.linear(pooled, weight[:out_dim], None if bias is None else bias[:out_dim])
    if normalize:
        out = F.normalize(out, dim=-1)
    return out


# ---- attention ----------------------------------------------------------------------------------

def rotary_tables(position_ids: torch.Tensor, rotary_dim: int, theta: float = 10000.0,
                  sections: tuple[int, int, int] | list[int] | None = None):
    """(cos, sin), each fp32 [T, rotary_dim / 2], for rotate-half rotary embeddings.

    position_ids [T] (1-D positions) or [3, T] (temporal, height, width: multimodal RoPE); with 3
    axes, `sections` gives how many of the rotary_dim / 2 frequencies follow each axis, in order.
    """
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float64, device=position_ids.device)
                                * 2.0 / rotary_dim))
    pos = position_ids.to(torch.float64)
    if pos.dim() == 1:
        angles = pos[:, None] * inv_freq[None, :]
    else:
        axis = torch.repeat_interleave(torch.arange(3, device=pos.device),
                                       torch.as_tensor(list(sections), device=pos.device))
        angles = pos[axis].transpose(0, 1) * inv_freq[None, :]  # [T, half]: freq j follows axis[j]
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on the first 2 * cos.shape[-1] dims of x [T, H, D], in x's dtype."""
    half = cos.shape[-1]
    c = cos.to(x.dtype)[:, None, :]
    s = sin.to(x.dtype)[:, None, :]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, causal: bool = False, softmax_scale: float | None = None,
                     rotary: tuple[torch.Tensor, torch.Tensor] | None = None, return_lse: bool = False):
    """Softmax attention within each packed sequence, computed in q's dtype, one sequence at a time.

    q [T, Hq, D], k / v [T, Hkv, D]; returns out [T, Hq, D] (and lse [Hq, T] fp32 / fp64).
    """
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    if rotary is not None:
        q = apply_rotary(q, *rotary)
        k = apply_rotary(k, *rotary)
    outs, lses = [], []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs = q[start:end].transpose(0, 1)                                   # [Hq, L, D]
        ks = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)   # [Hq, L, D]
        vs = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(-1, -2)) * scale
        if causal:
            n = end - start
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        outs.append((torch.softmax(scores, dim=-1) @ vs).transpose(0, 1))
        lses.append(torch.logsumexp(scores.to(_acc_dtype(q.dtype)), dim=-1))
    out = torch.cat(outs, dim=0) if outs else q.new_empty(0, Hq, v.shape[-1])
    if return_lse:
        lse = torch.cat(lses, dim=1) if lses else q.new_empty(Hq, 0, dtype=_acc_dtype(q.dtype))
        return out, lse
    return out
