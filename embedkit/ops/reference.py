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


def _bounds(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """int64 [B+1] sequence boundaries that are safe whatever cu_seqlens holds: entries clamped into
    [0, T], the first pinned to 0 and the last to T, made non-decreasing. Equal to cu_seqlens when it
    is valid; with validation off, a bad one gives wrong numbers but no index outside [0, T)."""
    x = cu_seqlens.long().clamp(0, total_tokens)
    x[0] = 0
    x[-1] = total_tokens
    return torch.cummax(x, 0).values


def segment_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """int64 [T]: the index of the sequence each packed token belongs to (no host sync). The oracles'
    own copy: production code uses embedkit.ops._varlen, so no kernel path depends on this module."""
    lengths = _bounds(cu_seqlens, total_tokens).diff()
    batch = torch.arange(lengths.numel(), device=cu_seqlens.device)
    # The lengths sum to T exactly (see _bounds): output_size never under- or over-runs.
    return torch.repeat_interleave(batch, lengths, output_size=total_tokens)


# Rows summed per first-level partial in masked_mean: two-level fp32 sums keep the rounding error
# near (chunk + length / chunk) ulps instead of length ulps (a 20M-token sequence of 1s and 2s
# accumulated row by row in fp32 stalls at 2^25).
_SUM_CHUNK = 4096


def masked_mean(hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                pool_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H] mean of the pooled tokens of each sequence, accumulated in fp32, in hidden's dtype.

    Token counts are integers (int64; an fp32 count saturates at 2^24 tokens); sums are fp32 in
    two levels (chunks of _SUM_CHUNK rows, then the chunks), fp64 for fp64 inputs."""
    total, width = hidden.shape
    batch = cu_seqlens.numel() - 1
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    bounds = _bounds(cu_seqlens, total)
    seg = torch.repeat_interleave(torch.arange(batch, device=dev), bounds.diff(), output_size=total)
    if pool_mask is None:
        counts = bounds.diff()
        rows = hidden.to(acc)
    else:
        # Exact integer counts from a prefix sum of the mask, read at the boundaries.
        prefix = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(pool_mask.long(), 0)])
        counts = prefix[bounds[1:]] - prefix[bounds[:-1]]
        rows = hidden.to(acc) * pool_mask.to(acc)[:, None]
    # key = sequence + global chunk index: non-decreasing over the packed tokens and one value per
    # (sequence, chunk) pair; the partials of a key are then summed into their sequence.
    keys = torch.arange(total, device=dev).div_(_SUM_CHUNK, rounding_mode="floor").add_(seg)
    n_keys = batch + max(total - 1, 0) // _SUM_CHUNK
    partial = torch.zeros(n_keys, width, dtype=acc, device=dev).index_add_(0, keys, rows)
    key_seq = torch.zeros(n_keys, dtype=torch.int64, device=dev).scatter_(0, keys, seg)
    sums = torch.zeros(batch, width, dtype=acc, device=dev).index_add_(0, key_seq, partial)
    return (sums / counts.to(acc)[:, None]).to(hidden.dtype)


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
        # Frequencies [start, start + n) of section a follow axis a (no index tensor: no host copy).
        parts, start = [], 0
        for a, n in enumerate(sections):
            parts.append(pos[a][:, None] * inv_freq[None, start:start + n])
            start += n
        angles = torch.cat(parts, dim=1)  # [T, half]
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
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    if rotary is not None:
        q = apply_rotary(q, *rotary)
        k = apply_rotary(k, *rotary)
    outs, lses = [], []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        # Query head h uses kv head h // group: [Hkv, group, L, D] against [Hkv, 1, L, D] (broadcast,
        # no repeated copies of k / v).
        qs = q[start:end].reshape(n, Hkv, group, D).permute(1, 2, 0, 3)
        ks = k[start:end].transpose(0, 1)[:, None]
        vs = v[start:end].transpose(0, 1)[:, None]
        scores = (qs @ ks.transpose(-1, -2)) * scale                        # [Hkv, group, L, L]
        if causal:
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        outs.append((torch.softmax(scores, dim=-1) @ vs).permute(2, 0, 1, 3).reshape(n, Hq, v.shape[-1]))
        if return_lse:
            lses.append(torch.logsumexp(scores.to(_acc_dtype(q.dtype)), dim=-1).reshape(Hq, n))
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


def sequence_fingerprint(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the 64-bit fingerprint of the bytes of each packed sequence of values [T, ...]
    (1-D token ids of TOKEN_ID_DTYPES are hashed as int64 values)."""
    if values.dim() == 1 and values.dtype in TOKEN_ID_DTYPES:
        values = values.to(torch.int64)
    rows = values.contiguous()
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


# ---- nce_loss -----------------------------------------------------------------------------------
# Tiled: rows are processed in chunks of at most _NCE_CHUNK_ELEMENTS logits; forward and backward walk
# the same chunks and hold one [chunk, candidates] logit block at a time (memory O(B * chunk), never
# [B, B]). The block lives in buffers allocated once per (direction, level) and rewritten in place, so
# the process's peak RSS stays O(B) under any allocator (thousands of short-lived chunk temporaries,
# as activation checkpointing makes, fragment glibc's heap into an O(B^2) resident set).

_NCE_CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in fp32)


def _nce_pair_mask(ids_a_r, ids_b_r, ids_a_c, ids_b_c, r0, r1, diag_offset, out=None, scratch=None):
    """[r1 - r0, N] bool: candidate j dropped from row i (ids match and j is not i's positive), or None
    without ids. Written into `out` (and `scratch`) when given."""
    drop = None
    for ids_r, ids_c in ((ids_a_r, ids_a_c), (ids_b_r, ids_b_c)):
        if ids_r is None:
            continue
        if drop is None:
            drop = torch.eq(ids_r[r0:r1, None], ids_c[None, :], **({} if out is None else {"out": out}))
        elif scratch is None:
            drop = drop | (ids_r[r0:r1, None] == ids_c[None, :])
        else:
            drop.logical_or_(torch.eq(ids_r[r0:r1, None], ids_c[None, :], out=scratch))
    if drop is not None:
        drop.diagonal(r0 + diag_offset).fill_(False)
    return drop


def _nce_chunk(bufs, r0, r1, diag_offset, inv_temp, ids, rows_n, cands_n, shared_n, row_neg_n, keep=None):
    """The logits of rows [r0, r1) (normalized inputs, accumulation dtype), masked: written into the
    chunk buffers `bufs` and returned as [candidates (masked), shared negatives, own negatives] blocks
    (absent ones omitted). s = cos / temperature; target j != i is -inf when ids match, and any
    candidate is -inf where the candidate mask `keep` (bool [M, N + S + K], columns in the blocks' order)
    is False, the positive excepted. Forward and backward call this same function, so the backward's
    scores are bit-identical to the forward's."""
    c = r1 - r0
    rows_c = rows_n[r0:r1]
    N = cands_n.shape[0]
    logits = torch.mm(rows_c, cands_n.t(), out=bufs["cands"][:c]).mul_(inv_temp)
    drop = _nce_pair_mask(*ids, r0, r1, diag_offset, out=bufs["drop"][:c] if "drop" in bufs else None,
                          scratch=bufs["scratch"][:c] if "scratch" in bufs else None)
    if keep is not None:
        left_out = ~keep[r0:r1, :N]
        left_out.diagonal(r0 + diag_offset).fill_(False)  # the positive always takes part
        drop = left_out if drop is None else drop.logical_or_(left_out)
    parts = [logits if drop is None else logits.masked_fill_(drop, float("-inf"))]
    col = N
    if shared_n is not None:
        parts.append(torch.mm(rows_c, shared_n.t(), out=bufs["shared"][:c]).mul_(inv_temp))
        if keep is not None:
            parts[-1].masked_fill_(~keep[r0:r1, col:col + shared_n.shape[0]], float("-inf"))
        col += shared_n.shape[0]
    if row_neg_n is not None:
        parts.append(torch.bmm(row_neg_n[r0:r1], rows_c[:, :, None], out=bufs["own"][:c, :, None])[:, :, 0]
                     .mul_(inv_temp))
        if keep is not None:
            parts[-1].masked_fill_(~keep[r0:r1, col:col + row_neg_n.shape[1]], float("-inf"))
    return parts


def _nce_buffers(rows_n, cands_n, shared_n, row_neg_n, ids, chunk):
    new = dict(dtype=rows_n.dtype, device=rows_n.device)
    n_ids = sum(i is not None for i in ids[:2])
    bufs = {"cands": torch.empty(chunk, cands_n.shape[0], **new)}
    if n_ids:
        bufs["drop"] = torch.empty(chunk, cands_n.shape[0], dtype=torch.bool, device=rows_n.device)
    if n_ids == 2:
        bufs["scratch"] = torch.empty_like(bufs["drop"])
    if shared_n is not None:
        bufs["shared"] = torch.empty(chunk, shared_n.shape[0], **new)
    if row_neg_n is not None:
        bufs["own"] = torch.empty(chunk, row_neg_n.shape[1], **new)
    return bufs


class _NCELevel(torch.autograd.Function):
    """Per-row loss [M] of one direction at one MRL level, on normalized inputs (accumulation dtype):
    loss_i = logsumexp_j s_ij - s_i,pos over the unmasked candidates (see _nce_chunk).

    The backward is the exact derivative, chunk by chunk over the same blocks: with
    P = softmax(s) (masked entries 0) and dS = g (P - onehot(pos)),
      d rows = (1/tau) dS [C; S; own],   d cands = (1/tau) dS^T rows,   d (1/tau) = sum(dS * cos),
    where the last is taken as tau sum_i g_i sum_j P_ij (s_ij - s_i,pos) (sum_j dS_ij = 0): centred on the
    positive, its terms are small where P is large, so it does not cancel two sums of size 1 / tau
    (sum_i <rows_i, (dS [C; S; own])_i> did: 12x the dense fp32 loss's error at tau = 0.07).
    A row whose only candidate is its positive has P = onehot exactly, hence dS = 0 exactly."""

    @staticmethod
    def forward(ctx, rows_n, cands_n, shared_n, row_neg_n, inv_temp, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                diag_offset, chunk, keep=None):
        ids = (ids_a_r, ids_b_r, ids_a_c, ids_b_c)
        M = rows_n.shape[0]
        bufs = _nce_buffers(rows_n, cands_n, shared_n, row_neg_n, ids, chunk)
        lse = rows_n.new_empty(M)
        pos = rows_n.new_empty(M)
        for r0 in range(0, M, chunk):
            r1 = min(M, r0 + chunk)
            parts = _nce_chunk(bufs, r0, r1, diag_offset, inv_temp, ids, rows_n, cands_n, shared_n, row_neg_n,
                               keep)
            pos[r0:r1] = parts[0].diagonal(r0 + diag_offset)
            # logsumexp over the blocks without concatenating them: max, then exp in place.
            top = parts[0].amax(dim=1)
            for p in parts[1:]:
                top = torch.maximum(top, p.amax(dim=1))
            total = sum(p.sub_(top[:, None]).exp_().sum(dim=1) for p in parts)
            lse[r0:r1] = top + total.log()
        temp_t = inv_temp if isinstance(inv_temp, torch.Tensor) else None
        ctx.save_for_backward(rows_n, cands_n, shared_n, row_neg_n, temp_t, *ids, keep, lse)
        ctx.args = (diag_offset, chunk, inv_temp if temp_t is None else None)
        return lse - pos

    @staticmethod
    def backward(ctx, grad):
        rows_n, cands_n, shared_n, row_neg_n, temp_t, *ids, keep, lse = ctx.saved_tensors
        diag_offset, chunk, inv_temp = ctx.args
        inv_temp = temp_t.detach() if temp_t is not None else inv_temp
        ids = tuple(ids)
        M = rows_n.shape[0]
        g = grad.to(rows_n.dtype)
        bufs = _nce_buffers(rows_n, cands_n, shared_n, row_neg_n, ids, chunk)
        want_temp = temp_t is not None and ctx.needs_input_grad[4]
        if want_temp:  # s - s_pos of one block, one buffer reused by every chunk (no allocator churn)
            width = max(bufs[k].shape[1] for k in ("cands", "shared", "own") if k in bufs)
            centred = rows_n.new_empty(chunk, width)
            t_rows = rows_n.new_zeros(M)             # sum_j P_ij (s_ij - s_i,pos) per row
        d_rows = torch.empty_like(rows_n)           # (dS [C; S; own]) per row, scaled by 1/tau at the end
        d_cands = torch.zeros_like(cands_n)
        d_shared = torch.zeros_like(shared_n) if shared_n is not None else None
        d_own = torch.empty_like(row_neg_n) if row_neg_n is not None else None
        for r0 in range(0, M, chunk):
            r1 = min(M, r0 + chunk)
            rows_c = rows_n[r0:r1]
            parts = _nce_chunk(bufs, r0, r1, diag_offset, inv_temp, ids, rows_n, cands_n, shared_n, row_neg_n,
                               keep)
            if want_temp:
                s_pos = parts[0].diagonal(r0 + diag_offset).clone()
            for p in parts:  # dS = g * P, in place
                if want_temp:  # -inf where masked, clamped: P = 0 times it is then 0
                    c_ = torch.sub(p, s_pos[:, None], out=centred[:r1 - r0, :p.shape[1]]).clamp_(min=-1e30)
                p.sub_(lse[r0:r1, None]).exp_()
                if want_temp:
                    t_rows[r0:r1] += c_.mul_(p).sum(dim=1)
                p.mul_(g[r0:r1, None])
            parts[0].diagonal(r0 + diag_offset).sub_(g[r0:r1])  # minus g at the positive
            out = torch.mm(parts[0], cands_n, out=d_rows[r0:r1])
            d_cands.addmm_(parts[0].t(), rows_c)
            k = 1
            if shared_n is not None:
                out.addmm_(parts[k], shared_n)
                d_shared.addmm_(parts[k].t(), rows_c)
                k += 1
            if row_neg_n is not None:
                out += torch.bmm(parts[k][:, None, :], row_neg_n[r0:r1])[:, 0]
                torch.mul(parts[k][:, :, None], rows_c[:, None, :], out=d_own[r0:r1])
        d_temp = ((g * t_rows).sum() / inv_temp).reshape(temp_t.shape) if want_temp else None
        grads = [d_rows, d_cands, d_shared, d_own]
        grads = [x.mul_(inv_temp) if x is not None else None for x in grads]
        return (*grads, d_temp, None, None, None, None, None, None, None)


def _nce_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) along the last dim, in the accumulation dtype (fp32 for fp16 / bf16,
    whose eps would underflow to 0 and turn a zero row into NaN)."""
    return F.normalize(x.to(_acc_dtype(x.dtype)), dim=-1)


def nce_direction(rows: torch.Tensor, cands: torch.Tensor, shared_neg: torch.Tensor | None,
                  row_neg: torch.Tensor | None, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset: int,
                  temperature, dims, weights, chunk_rows: int | None = None,
                  cand_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One direction of the NCE loss, per row [M] (summed over MRL levels with `weights`).

    rows [M, D] against candidates cands [N, D] (row i's positive is cands[i + diag_offset]),
    shared_neg [S, D] (extra candidates of every row, never masked), row_neg [M, K, D] (row i's own
    negatives). ids_*: integer query ids (a) / target ids (b) of rows (r) and candidates (c), or None.
    cand_mask: bool [M, N + S + K] over the candidates in that order (True = takes part), or None; the
    positive takes part whatever it says.
    temperature: a float or a 0-dim tensor; 1/temperature is taken in the accumulation dtype (fp32,
    fp64 for fp64 inputs), where all the arithmetic runs.
    """
    M = rows.shape[0]
    N = cands.shape[0] + (shared_neg.shape[0] if shared_neg is not None else 0)
    chunk = chunk_rows or max(1, min(M, _NCE_CHUNK_ELEMENTS // max(1, N)))
    chunk = min(chunk, M)
    acc = _acc_dtype(rows.dtype)
    if isinstance(temperature, torch.Tensor):
        inv_temp = 1.0 / temperature.to(acc)
    else:
        inv_temp = 1.0 / float(temperature)
    total = None
    for d, w in zip(dims, weights):
        rows_n = _nce_normalize(rows[:, :d])
        cands_n = _nce_normalize(cands[:, :d])
        shared_n = _nce_normalize(shared_neg[:, :d]) if shared_neg is not None else None
        row_neg_n = _nce_normalize(row_neg[..., :d]) if row_neg is not None else None
        level = _NCELevel.apply(rows_n, cands_n, shared_n, row_neg_n, inv_temp, ids_a_r, ids_b_r, ids_a_c,
                                ids_b_c, int(diag_offset), chunk, cand_mask) * w
        total = level if total is None else total + level
    return total


def nce_loss(query: torch.Tensor, target: torch.Tensor, *, negatives: torch.Tensor | None = None,
             temperature=0.05, query_ids: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
             symmetric: bool = False, shared_negatives: bool = False, mrl_dims=None, mrl_weights=None,
             reduction: str = "mean", candidate_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tiled pure-torch NCE loss of one process (embedkit.ops.nce_loss's semantics without `group`);
    the loss is in fp32 (fp64 for fp64 inputs), as is all the arithmetic (inputs are normalized in
    fp32). The cross-rank composition lives with the op (embedkit.ops.nce.nce_combine)."""
    B, D = query.shape
    dims = tuple(mrl_dims) if mrl_dims is not None else (D,)
    weights = tuple(float(w) for w in mrl_weights) if mrl_weights is not None else (1.0,) * len(dims)
    K = negatives.shape[1] if negatives is not None else 0
    shared = negatives.reshape(B * K, D) if (negatives is not None and shared_negatives and K > 0) else None
    row_neg = negatives if (negatives is not None and not shared_negatives and K > 0) else None
    ids = (query_ids, target_ids, query_ids, target_ids)
    loss = nce_direction(query, target, shared, row_neg, *ids, 0, temperature, dims, weights,
                         cand_mask=candidate_mask)
    if symmetric:
        back_mask = candidate_mask[:, :B].t() if candidate_mask is not None else None  # pair (i, j) both ways
        loss = (loss + nce_direction(target, query, None, None, *ids, 0, temperature, dims, weights,
                                     cand_mask=back_mask)) * 0.5
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
