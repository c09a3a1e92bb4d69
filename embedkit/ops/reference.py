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


# ---- sequence_fingerprint, pack / unpack ------------------------------------------------------------
# The fingerprint is defined in csrc/include/embedkit.h; this is the same computation in int64 torch
# arithmetic (wrapping multiply / add are mod 2^64; logical right shifts are masked arithmetic ones),
# so the reference, the C++ twin and the CUDA kernel agree bit for bit.

def _as_int64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_FMIX_C1 = _as_int64(0xFF51AFD7ED558CCD)
_FMIX_C2 = _as_int64(0xC4CEB9FE1A85EC53)
FP_SEED = _as_int64(0x9E3779B97F4A7C15)
FP_LEN_SEED = _as_int64(0xD6E8FEB86659FD93)
# 1-D tensors of these dtypes are token ids: fingerprinted by value, as int64, so that int32 and
# int64 ids of the same text agree. Every other tensor is fingerprinted by its raw bytes.
TOKEN_ID_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def fmix64(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 64-bit finalizer on int64 bit patterns."""
    x = x ^ _shr(x, 33)
    x = x * _FMIX_C1
    x = x ^ _shr(x, 33)
    x = x * _FMIX_C2
    return x ^ _shr(x, 33)


def fingerprint_rows(values: torch.Tensor) -> torch.Tensor:
    """The contiguous tensor whose raw row bytes are fingerprinted (token ids widened to int64)."""
    if values.dim() == 1 and values.dtype in TOKEN_ID_DTYPES:
        values = values.to(torch.int64)
    return values.contiguous()


def sequence_fingerprint(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the 64-bit fingerprint of the bytes of each packed sequence of values [T, ...]."""
    rows = fingerprint_rows(values)
    total = rows.shape[0]
    data = rows.view(torch.uint8).reshape(total, -1) if rows.numel() else \
        torch.empty(total, 0, dtype=torch.uint8, device=rows.device)
    row_bytes = data.shape[1]
    flat = data.reshape(-1)
    dev = rows.device
    cu = cu_seqlens.long()
    nbytes = (cu[1:] - cu[:-1]) * row_bytes
    nwords = (nbytes + 3) // 4
    batch = nbytes.numel()
    n_all = int(nwords.sum())
    seq = torch.repeat_interleave(torch.arange(batch, device=dev), nwords, output_size=n_all)
    k = torch.arange(n_all, device=dev) - (torch.cumsum(nwords, 0) - nwords)[seq]  # word index in sequence
    byte_in_seq = 4 * k[:, None] + torch.arange(4, device=dev)[None, :]
    valid = byte_in_seq < nbytes[seq][:, None]
    pos = (cu[:-1] * row_bytes)[seq][:, None] + byte_in_seq
    if flat.numel():
        b = flat[pos.clamp(max=flat.numel() - 1)].long() * valid
    else:
        b = torch.zeros_like(pos)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
    terms = fmix64(((k << 32) | word) ^ FP_SEED)
    sums = torch.zeros(batch, dtype=torch.int64, device=dev).index_add_(0, seq, terms)
    return fmix64(sums + fmix64(nbytes ^ FP_LEN_SEED))


def _padded_indices(cu_seqlens: torch.Tensor, padded_len: int, total: int,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Flat [B * padded_len] index of each packed token (mask order, or right-padded)."""
    if attention_mask is not None:
        return torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    seg = segment_ids(cu_seqlens, total)
    offs = torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[seg]
    return seg * padded_len + offs


def pack(padded: torch.Tensor, cu_seqlens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Packed [T, ...] tokens of padded [B, L, ...]: those where attention_mask [B, L] is nonzero,
    in order, or (mask None) the first cu_seqlens[b+1] - cu_seqlens[b] positions of each row."""
    batch, length = padded.shape[:2]
    flat = padded.reshape(batch * length, *padded.shape[2:])
    idx = _padded_indices(cu_seqlens, length, int(cu_seqlens[-1]), attention_mask)
    return flat.index_select(0, idx)


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, padded_len: int,
           attention_mask: torch.Tensor | None = None, padding_value: float = 0.0) -> torch.Tensor:
    """Padded [B, padded_len, ...] of packed [T, ...] (the inverse of pack), padding = padding_value."""
    batch = cu_seqlens.numel() - 1
    idx = _padded_indices(cu_seqlens, padded_len, packed.shape[0], attention_mask)
    out = packed.new_full((batch * padded_len, *packed.shape[1:]), padding_value)
    return out.index_copy(0, idx, packed).view(batch, padded_len, *packed.shape[1:])
