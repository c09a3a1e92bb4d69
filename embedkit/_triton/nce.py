"""Tiled large-batch NCE (InfoNCE) loss with MRL levels: Triton kernels and host launchers.

One "direction" of the loss: rows x_i (queries) against candidates y_j (targets, then optionally
shared negatives) plus K per-row negatives. For every MRL level l with prefix width d_l:

    s^l_ij = <x_i[:d_l], y_j[:d_l]> * a^l_i * b^l_j          (cosine; a, b = inverse prefix norms)
    lse^l_i = logsumexp over the unmasked candidates of s^l_ij / tau
    loss_i  = sum_l w_l * (lse^l_i - s^l_{i,pos(i)} / tau)

Forward: nothing of size [rows, candidates] is stored. Candidate tiles stream through an online
logsumexp in fp32 that keeps, per row and level, the running max / sum / p-weighted cosine. ALL levels
share one pass over D: the dot of the d_0-prefix is the start of the d_1-prefix one, and each level's
update runs as the dot crosses its width (one live fp32 tile). Tiles up to 128 x 256, autotuned on a
GPU; the candidate axis is split when the row tiles cannot fill the SMs (partial states merged in a
fixed order).

Backward, GEMM-shaped: with P^l_ij = g^l_i (p^l_ij - [j == pos(i)]) / tau,
    d x_i = sum_l a_i ( sum_j P^l_ij b_j y_j[:d_l]  -  a_i R^l_i x_i[:d_l] ),  R^l_i = sum_j P^l_ij s^l_ij
(the second term is the L2 normalization's backward); d y_j is the same with the roles swapped. Per
block of rows x candidates (sizes bounded: ROW_CHUNK x CAND_CHUNK) one kernel recomputes the scores once
and writes, per segment k = [d_{k-1}, d_k) of D, E_k = sum_{l >= k} P^l a^l b^l; then dX[:, seg_k] +=
E_k Y[:, seg_k] and dY[:, seg_k] += E_k^T X[:, seg_k] are plain matmuls (cuBLAS on a GPU) and the
normalization terms row scalings. Deterministic: partial sums are summed in a fixed order, no atomics.

Masking: candidate j != pos(i) is dropped from row i when ids_a or ids_b match, or when the optional
candidate mask (bool [M, N + S + K], a uint8 view read per tile behind the HAS_CAND_MASK constexpr: B x C
bytes of reads, nothing without it) is False at (i, j); the positive is never dropped. A dropped
candidate gets probability exactly 0 through `tl.where` (never a -inf logit), so a learnable
temperature never sees inf - inf. A row whose only candidate is its positive has loss exactly 0 and,
because the backward takes the positive's probability from the loss term itself, gradient exactly 0.

At most 3 levels per pass (MAX_LEVELS); the launchers run longer MRL lists in groups of 3.

Cost: forward 2 B N D FLOPs, backward 2 (one recomputation) + 4 (two gradient GEMMs) B N D: 8 B N D in
all (the previous kernels: 12, with an fp32 gradient slab read-modify-written per streamed tile).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._common import (TRITON_VERSION, dot_acc, dot_args, gpu_autotune, tma_operands,
                      interpreter_config, launch_arg)

MAX_LEVELS = 3
_INTERPRET = tl.constexpr(INTERPRET)
_NEG_INIT = tl.constexpr(-1.0e30)  # finite "minus infinity" of the online max: exp(_NEG_INIT - _NEG_INIT) = 1, never NaN


# ---- device helpers ---------------------------------------------------------------------------

@triton.jit
def _dot_range(acc, x, stride_x, offs_x, x_ok, y, stride_y, offs_y, y_ok, lo, hi, x0, y0,
               BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
               ALIGNED: tl.constexpr, USE_TMA: tl.constexpr):
    """acc[m, n] += <x[offs_x[m], lo:hi], y[offs_y[n], lo:hi]>; rows / candidates outside x_ok / y_ok
    give garbage dots that the callers never use (the score mask includes them).

    USE_TMA: x, y are device-side tensor descriptors (_level_desc) whose column count ends at hi or at a
    multiple of BLOCK_D past it, and the tiles start at rows x0 / y0 (offs_x = x0 + arange): TMA zero-fills
    what lies outside, so there are no pointer tiles, row clamps or D predicates (the pointer tiles cost
    about 64 registers per operand at 8 warps)."""
    if USE_TMA:
        for d0 in range(lo, hi, BLOCK_D):
            acc = dot_acc(acc, x.load([x0, d0]), tl.trans(y.load([y0, d0])), DOT_DTYPE, DOT_PREC)
    else:
        # Rows past the end read row 0 instead of being masked: a [BLOCK, BLOCK_D] predicate per operand
        # held through the pipelined loop cost registers (the callers drop those rows' scores anyway).
        rx = tl.where(x_ok, offs_x, 0).to(tl.int64) * stride_x
        ry = tl.where(y_ok, offs_y, 0).to(tl.int64) * stride_y
        if ALIGNED:
            # Every level width a multiple of BLOCK_D: no D predicate, one pointer tile per operand
            # advanced by the scalar d0.
            px = x + rx[:, None] + tl.arange(0, BLOCK_D)[None, :]
            py = y + ry[None, :] + tl.arange(0, BLOCK_D)[:, None]
            for d0 in range(lo, hi, BLOCK_D):
                acc = dot_acc(acc, tl.load(px + d0), tl.load(py + d0), DOT_DTYPE, DOT_PREC)
        else:
            for d0 in range(lo, hi, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < hi
                xt = tl.load(x + rx[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
                yt = tl.load(y + ry[None, :] + offs_d[:, None], mask=d_ok[:, None], other=0.0)
                acc = dot_acc(acc, xt, yt, DOT_DTYPE, DOT_PREC)
    return acc


@triton.jit
def _level_desc(ptr, rows, stride, width, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """A [rows, width] view of ptr (row stride `stride`) as a TMA descriptor of [BLOCK_R, BLOCK_D] boxes
    under USE_TMA, else ptr itself. width = a level's end: TMA zero-fills the columns past it, which stands
    in for the D predicate of unaligned levels."""
    if USE_TMA:
        return tl.make_tensor_descriptor(ptr, shape=[rows, width], strides=[stride, 1],
                                         block_shape=[BLOCK_R, BLOCK_D])
    else:
        return ptr


@triton.jit
def _level_descs(x, M, stride_x, y, N, stride_y, D0, D1, D2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, NUM_LEVELS: tl.constexpr, ALIGNED: tl.constexpr, USE_TMA: tl.constexpr):
    """The operands of each level's dot range (x0, x1, x2, y0, y1, y2): pointers, or (USE_TMA) descriptors
    ending at the level's width (ALIGNED: one pair D2 wide serves every level; unused levels repeat level 0)."""
    if ALIGNED:
        xa = _level_desc(x, M, stride_x, D2, BLOCK_M, BLOCK_D, USE_TMA)
        ya = _level_desc(y, N, stride_y, D2, BLOCK_N, BLOCK_D, USE_TMA)
        return xa, xa, xa, ya, ya, ya
    else:
        x0 = _level_desc(x, M, stride_x, D0, BLOCK_M, BLOCK_D, USE_TMA)
        y0 = _level_desc(y, N, stride_y, D0, BLOCK_N, BLOCK_D, USE_TMA)
        x1 = x0
        y1 = y0
        x2 = x0
        y2 = y0
        if NUM_LEVELS > 1:
            x1 = _level_desc(x, M, stride_x, D1, BLOCK_M, BLOCK_D, USE_TMA)
            y1 = _level_desc(y, N, stride_y, D1, BLOCK_N, BLOCK_D, USE_TMA)
        if NUM_LEVELS > 2:
            x2 = _level_desc(x, M, stride_x, D2, BLOCK_M, BLOCK_D, USE_TMA)
            y2 = _level_desc(y, N, stride_y, D2, BLOCK_N, BLOCK_D, USE_TMA)
        return x0, x1, x2, y0, y1, y2


@triton.jit
def _online_update(m, l, t, z, valid):
    """One tile of the online logsumexp in logit units: running max m (_NEG_INIT while a row has had
    nothing valid), l = sum exp(z - m), t = sum exp(z - m) (z - m) (for E_p[z] - m, the temperature's
    gradient: taken about the running max, its terms are small where p is large, so E_p[z] - z_pos does
    not cancel two logits of size 1 / tau). Only the masked logits zm are kept live (no separate cosine
    tile, no predicate tile after the max)."""
    zm = tl.where(valid, z, _NEG_INIT)
    m_new = tl.maximum(m, tl.max(zm, axis=1))
    # Rows with nothing valid yet subtract 0, so their masked entries give exp(-1e30) = 0 (not exp(0)).
    m_sub = tl.where(m_new > _NEG_INIT, m_new, 0.0)
    alpha = tl.where(m > _NEG_INIT, tl.exp(m - m_sub), 0.0)
    arg = zm - m_sub[:, None]
    p = tl.exp(arg)  # exactly 0 when masked (and then p * arg = 0: arg is finite)
    # Moving the centre from m to m_sub: sum e (z - m_sub) = sum e (z - m) + (m - m_sub) l (0 while l = 0).
    return m_new, l * alpha + tl.sum(p, axis=1), (t + (m - m_sub) * l) * alpha + tl.sum(p * arg, axis=1)


@triton.jit
def _pair_mask(offs_r, r_ok, offs_c, c_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset,
               cmask, stride_cm, cm_col0, HAS_IDS_A: tl.constexpr, HAS_IDS_B: tl.constexpr,
               HAS_DIAG: tl.constexpr, ROW_FIRST: tl.constexpr, HAS_CAND_MASK: tl.constexpr):
    """(valid, is_pos) of query rows offs_r x candidates offs_c, laid out [R, C] when ROW_FIRST
    else [C, R]. Candidate j != pos(i) is dropped when the ids of i and j match, or (HAS_CAND_MASK)
    when the candidate mask's byte cmask[i * stride_cm + cm_col0 + j] is 0; the positive is always kept."""
    if ROW_FIRST:
        r2 = offs_r[:, None]
        c2 = offs_c[None, :]
        valid = r_ok[:, None] & c_ok[None, :]
    else:
        r2 = offs_r[None, :]
        c2 = offs_c[:, None]
        valid = c_ok[:, None] & r_ok[None, :]
    if HAS_CAND_MASK:
        # B x C bytes of reads; loaded only inside the tile's bounds (never outside the mask tensor).
        keep = tl.load(cmask + r2.to(tl.int64) * stride_cm + cm_col0 + c2, mask=valid, other=0) != 0
    if HAS_DIAG:
        is_pos = (r2 + diag_offset) == c2
        drop = r2 < 0  # all False
        if HAS_IDS_A:
            ia = tl.load(ids_a_r + offs_r, mask=r_ok, other=0)
            ja = tl.load(ids_a_c + offs_c, mask=c_ok, other=0)
            if ROW_FIRST:
                drop = drop | (ia[:, None] == ja[None, :])
            else:
                drop = drop | (ja[:, None] == ia[None, :])
        if HAS_IDS_B:
            ib = tl.load(ids_b_r + offs_r, mask=r_ok, other=0)
            jb = tl.load(ids_b_c + offs_c, mask=c_ok, other=0)
            if ROW_FIRST:
                drop = drop | (ib[:, None] == jb[None, :])
            else:
                drop = drop | (jb[:, None] == ib[None, :])
        if HAS_CAND_MASK:
            drop = drop | (keep == 0)
        valid = valid & ((drop == 0) | is_pos)
        is_pos = is_pos & valid
    else:
        if HAS_CAND_MASK:
            valid = valid & keep
        is_pos = r2 < 0
        is_pos = is_pos & valid
    return valid, is_pos


@triton.jit
def _pair_mask_off_diag(offs_r, r_ok, offs_c, c_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cmask, stride_cm, cm_col0,
                        HAS_IDS_A: tl.constexpr, HAS_IDS_B: tl.constexpr, HAS_CAND_MASK: tl.constexpr):
    """_pair_mask's `valid` (ROW_FIRST) for a tile that holds none of its rows' positives: the id and candidate
    mask drops without the positive's comparison tile."""
    valid = r_ok[:, None] & c_ok[None, :]
    if HAS_IDS_A:
        ia = tl.load(ids_a_r + offs_r, mask=r_ok, other=0)
        ja = tl.load(ids_a_c + offs_c, mask=c_ok, other=0)
        valid = valid & (ia[:, None] != ja[None, :])
    if HAS_IDS_B:
        ib = tl.load(ids_b_r + offs_r, mask=r_ok, other=0)
        jb = tl.load(ids_b_c + offs_c, mask=c_ok, other=0)
        valid = valid & (ib[:, None] != jb[None, :])
    if HAS_CAND_MASK:
        keep = tl.load(cmask + offs_r[:, None].to(tl.int64) * stride_cm + cm_col0 + offs_c[None, :], mask=valid,
                       other=0) != 0
        valid = valid & keep
    return valid


# ---- kernels ----------------------------------------------------------------------------------

@triton.jit
def _load_levels(ptr, level_stride, offs, ok, NUM_LEVELS: tl.constexpr):
    """The per-row values of up to 3 MRL levels stored level-major ([L, N] with row stride
    level_stride); levels past NUM_LEVELS repeat level 0 (never used)."""
    v0 = tl.load(ptr + offs, mask=ok, other=0.0)
    v1 = v0
    v2 = v0
    if NUM_LEVELS > 1:
        v1 = tl.load(ptr + level_stride + offs, mask=ok, other=0.0)
    if NUM_LEVELS > 2:
        v2 = tl.load(ptr + 2 * level_stride + offs, mask=ok, other=0.0)
    return v0, v1, v2


@triton.jit
def _store_levels(ptr, level_stride, offs, ok, v0, v1, v2, NUM_LEVELS: tl.constexpr):
    tl.store(ptr + offs, v0, mask=ok)
    if NUM_LEVELS > 1:
        tl.store(ptr + level_stride + offs, v1, mask=ok)
    if NUM_LEVELS > 2:
        tl.store(ptr + 2 * level_stride + offs, v2, mask=ok)


@triton.jit
def _level_span(lvl: tl.constexpr, D0, D1, D2):
    """[lo, hi): the dims that MRL level `lvl` adds to the previous prefix (level 0 starts at 0)."""
    if lvl == 0:
        return 0, D0
    elif lvl == 1:
        return D0, D1
    else:
        return D1, D2


@triton.jit
def _nce_prefix_inv_norm_kernel(x, stride_x, out, N, D0, D1, D2, NUM_LEVELS: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[l, i] = 1 / max(||x_i[:d_l]||, 1e-12) (F.normalize's eps), all levels in one pass."""
    offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < N
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for lvl in tl.static_range(NUM_LEVELS):
        lo, hi = _level_span(lvl, D0, D1, D2)
        for d0 in range(lo, hi, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            v = tl.load(x + offs[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                        mask=ok[:, None] & (offs_d < hi)[None, :], other=0.0).to(tl.float32)
            acc += v * v
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(acc, axis=1)), 1e-12)
        tl.store(out + lvl * N + offs, inv, mask=ok)


@triton.jit
def _nce_row_negative_cos_kernel(x, stride_x, neg, inv_x, inv_neg, cos, B, K, D0, D1, D2,
                                 NUM_LEVELS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """cos[l, i, k] = cosine of x_i and its own negative neg[i, k] at every level (neg is [B, K, D])."""
    offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < B
    for k in range(0, K):
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for lvl in tl.static_range(NUM_LEVELS):
            lo, hi = _level_span(lvl, D0, D1, D2)
            for d0 in range(lo, hi, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                m2 = ok[:, None] & (offs_d < hi)[None, :]
                xv = tl.load(x + offs[:, None].to(tl.int64) * stride_x + offs_d[None, :], mask=m2, other=0.0)
                nv = tl.load(neg + (offs[:, None].to(tl.int64) * K + k) * stride_x + offs_d[None, :],
                             mask=m2, other=0.0)
                acc += xv.to(tl.float32) * nv.to(tl.float32)
            a = tl.load(inv_x + lvl * B + offs, mask=ok, other=0.0)
            b = tl.load(inv_neg + lvl * B * K + offs * K + k, mask=ok, other=0.0)
            tl.store(cos + (lvl * B + offs) * K + k, tl.sum(acc, axis=1) * a * b, mask=ok)


# Forward tiles. One fp32 score tile is live at a time (each level's online update runs as soon as the dot
# crosses that level's width) and only masked logits, no cosine or predicate tile, live through the update.
# Checked with the static sm_90a report (Triton 3.9, ptxas): 1 level 128 x 128 / 8 warps, no spills;
# 3 levels spill at 128 x 128 (the accumulator stays live through each level's update) but not at
# 128 x 64 / 8 warps when the widths are multiples of 64 (ALIGNED: no D predicate, one pointer tile per
# operand; unaligned 128 x 64 spills in the loop) or at 64 x 128 / 8, 3 stages (4 stages spill a few words
# in the loop); 128 x 256 and 16 warps (128-register cap) spill everywhere. BLOCK_D = 64: 128-byte rows of
# bf16; the pipeline depth is tuned.
# With TMA (USE_TMA: no pointer tiles, row clamps or D predicates) 1 level 128 x 128 takes about 220 registers
# instead of 255, 3 levels 128 x 64 about 177 instead of 255 (aligned or not); 3 levels at 128 x 128 run as two
# 128 x 64 accumulators sharing each X tile (SPLIT), the diagonal's tiles apart: spill-free in the loops under
# Triton 3.6 and (3 stages) 3.9: kept per version (_FWD_SPLIT_128_VERSIONS). With the candidate mask: 64 x 64 as before.
_FWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": 64}, num_warps=w, num_stages=s)
                for m, n, w, s in ((128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4),
                                   (64, 128, 8, 3), (64, 128, 8, 4), (64, 64, 8, 3), (64, 64, 4, 3))]


def _fit_operands(configs, named_args, kwargs):
    """fp32 operands need twice the shared memory per stage (128 x 128 x 4 stages > 227 KiB): tiles of at
    most 64 x 128 then."""
    if launch_arg(named_args, kwargs, "DOT_DTYPE") != tl.float32:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128]


@triton.jit
def _dot_range_halves(acc_a, acc_b, x, y, lo, hi, x0, y0, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """_dot_range's TMA path for two candidate halves [y0, y0 + HALF), [y0 + HALF, y0 + 2 HALF) sharing
    each X tile (x, y descriptors; y's boxes HALF rows)."""
    for d0 in range(lo, hi, BLOCK_D):
        xt = x.load([x0, d0])
        acc_a = dot_acc(acc_a, xt, tl.trans(y.load([y0, d0])), DOT_DTYPE, DOT_PREC)
        acc_b = dot_acc(acc_b, xt, tl.trans(y.load([y0 + HALF, d0])), DOT_DTYPE, DOT_PREC)
    return acc_a, acc_b


@triton.jit
def _fwd_logits(acc, a, inv_y_level, offs_n, n_ok, it):
    """A level's logits ((dot * a) * b) * (1 / tau) of one [rows, cands] dot tile: the one expression of the
    forward's online update and of its positive's extraction (POS_AFTER), so both see the same bits."""
    return acc * a[:, None] * tl.load(inv_y_level + offs_n, mask=n_ok, other=0.0)[None, :] * it


@triton.jit
def _pos_logit(z, offs_m, offs_n, n_ok, diag_offset):
    """Row sums of z at each row's positive (candidate offs_m + diag_offset, where inside offs_n / n_ok): the
    positive's logit where the tile holds it, else exactly 0. An in-range positive is never masked; rows past
    M are never stored."""
    return tl.sum(tl.where(((offs_n[None, :] - offs_m[:, None]) == diag_offset) & n_ok[None, :], z, 0.0), axis=1)


@triton.jit
def _nce_fwd_update(acc, offs_m, m_ok, offs_n, n_ok, a, inv_y_level, it, m, l, t, p, ids_a_r, ids_b_r, ids_a_c,
                    ids_b_c, diag_offset, cmask, stride_cm, cm_col0, HAS_IDS_A: tl.constexpr,
                    HAS_IDS_B: tl.constexpr, HAS_DIAG: tl.constexpr, HAS_CAND_MASK: tl.constexpr,
                    POS_MODE: tl.constexpr):
    """A level's logits of one [rows, cands] dot tile (scaled by its inverse norms a, b and 1 / tau) folded
    into its online logsumexp (m, l, t) and positive logit p. The pair mask is built here, after the dot
    range, never kept live across one. POS_MODE (with HAS_DIAG): 0 the positive's logit through the mask's
    is_pos; 1 taken before the mask with its own comparison (the split tiles' diagonal tiles); 2 a tile known
    to hold no positive of its rows (the split tiles off the diagonal): no positive's comparison at all."""
    z = _fwd_logits(acc, a, inv_y_level, offs_n, n_ok, it)
    if HAS_DIAG and POS_MODE == 2:
        valid = _pair_mask_off_diag(offs_m, m_ok, offs_n, n_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c, cmask,
                                    stride_cm, cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_CAND_MASK)
    else:
        if HAS_DIAG and POS_MODE == 1:
            p += _pos_logit(z, offs_m, offs_n, n_ok, diag_offset)
        valid, is_pos = _pair_mask(offs_m, m_ok, offs_n, n_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                                   diag_offset, cmask, stride_cm, cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_DIAG, True,
                                   HAS_CAND_MASK)
        if HAS_DIAG and POS_MODE == 0:
            p += tl.sum(tl.where(is_pos, z, 0.0), axis=1)
    m, l, t = _online_update(m, l, t, z, valid)
    return m, l, t, p


@triton.jit
def _nce_fwd_level(acc, acc_b, x, stride_x, offs_m, m_ok, y, stride_y, offs_n, n_ok, n_hi, d_lo, d_hi, m_start,
                   n_start, a, inv_y_level, it, m, l, t, p, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, cmask,
                   stride_cm, cm_col0, HAS_IDS_A: tl.constexpr, HAS_IDS_B: tl.constexpr, HAS_DIAG: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, ALIGNED: tl.constexpr,
                   HAS_CAND_MASK: tl.constexpr, USE_TMA: tl.constexpr, SPLIT: tl.constexpr, HALF: tl.constexpr,
                   POS_MODE: tl.constexpr):
    """One MRL level's step of the forward: the dot carried on over columns [d_lo, d_hi), then that level's
    online update (_nce_fwd_update). SPLIT: the candidate tile is two HALF-wide accumulators (acc, acc_b)
    sharing each X tile, updated one after the other, so that one half's logits and the other half's
    accumulator are what is live (not a full tile's logits beside the full accumulator)."""
    if SPLIT:
        acc, acc_b = _dot_range_halves(acc, acc_b, x, y, d_lo, d_hi, m_start, n_start, HALF, BLOCK_D,
                                       DOT_DTYPE, DOT_PREC)
        offs_a = n_start + tl.arange(0, HALF)
        m, l, t, p = _nce_fwd_update(acc, offs_m, m_ok, offs_a, offs_a < n_hi, a, inv_y_level, it, m, l, t, p,
                                     ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, cmask, stride_cm, cm_col0,
                                     HAS_IDS_A, HAS_IDS_B, HAS_DIAG, HAS_CAND_MASK, POS_MODE)
        m, l, t, p = _nce_fwd_update(acc_b, offs_m, m_ok, offs_a + HALF, (offs_a + HALF) < n_hi, a, inv_y_level,
                                     it, m, l, t, p, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, cmask,
                                     stride_cm, cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_DIAG, HAS_CAND_MASK, POS_MODE)
    else:
        acc = _dot_range(acc, x, stride_x, offs_m, m_ok, y, stride_y, offs_n, n_ok,
                         d_lo, d_hi, m_start, n_start, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, USE_TMA)
        m, l, t, p = _nce_fwd_update(acc, offs_m, m_ok, offs_n, n_ok, a, inv_y_level, it, m, l, t, p,
                                     ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, cmask, stride_cm, cm_col0,
                                     HAS_IDS_A, HAS_IDS_B, HAS_DIAG, HAS_CAND_MASK, POS_MODE)
    return acc, acc_b, m, l, t, p


@triton.jit
def _nce_fwd_tile(n0, xd0, xd1, xd2, yd0, yd1, yd2, stride_x, stride_y, offs_m, m_ok, m_start, n_hi, a0, a1, a2, inv_y,
                  N, it, m0, l0, t0, p0, m1, l1, t1, p1, m2, l2, t2, p2, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                  diag_offset, cmask, stride_cm, cm_col0, D0, D1, D2, NUM_LEVELS: tl.constexpr,
                  HAS_IDS_A: tl.constexpr, HAS_IDS_B: tl.constexpr, HAS_DIAG: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                  ALIGNED: tl.constexpr, HAS_CAND_MASK: tl.constexpr, USE_TMA: tl.constexpr, SPLIT: tl.constexpr,
                  HALF: tl.constexpr, POS_MODE: tl.constexpr):
    """Candidate tile [n0, n0 + BLOCK_N) through every level's online update (state m, l, t, p per level)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_hi
    # One live fp32 tile: each level's update runs when the dot has crossed that level's width. The
    # [BLOCK_M, BLOCK_N] mask is formed after each dot range, never kept live across one (at 128 x 128
    # two predicate tiles held through the D loop made ptxas spill).
    acc = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    acc_b = acc
    acc, acc_b, m0, l0, t0, p0 = _nce_fwd_level(
        acc, acc_b, xd0, stride_x, offs_m, m_ok, yd0, stride_y, offs_n, n_ok, n_hi, 0, D0, m_start, n0, a0, inv_y,
        it, m0, l0, t0, p0, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, cmask, stride_cm, cm_col0, HAS_IDS_A,
        HAS_IDS_B, HAS_DIAG, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, HAS_CAND_MASK, USE_TMA, SPLIT, HALF, POS_MODE)
    if NUM_LEVELS > 1:
        acc, acc_b, m1, l1, t1, p1 = _nce_fwd_level(
            acc, acc_b, xd1, stride_x, offs_m, m_ok, yd1, stride_y, offs_n, n_ok, n_hi, D0, D1, m_start, n0, a1,
            inv_y + N, it, m1, l1, t1, p1, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, cmask, stride_cm,
            cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_DIAG, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, HAS_CAND_MASK, USE_TMA,
            SPLIT, HALF, POS_MODE)
    if NUM_LEVELS > 2:
        acc, acc_b, m2, l2, t2, p2 = _nce_fwd_level(
            acc, acc_b, xd2, stride_x, offs_m, m_ok, yd2, stride_y, offs_n, n_ok, n_hi, D1, D2, m_start, n0, a2,
            inv_y + 2 * N, it, m2, l2, t2, p2, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, cmask, stride_cm,
            cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_DIAG, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, HAS_CAND_MASK, USE_TMA,
            SPLIT, HALF, POS_MODE)
    return m0, l0, t0, p0, m1, l1, t1, p1, m2, l2, t2, p2


# Triton versions whose 3-level split 128 x 128 forward (TMA) compiles without spills in its candidate loops
# (static sm_90a figures), with the pipeline depths that do: Triton 3.6 at 3 and 4 stages; 3.9 at 3 stages only
# (4 stages reload about 8 words in the loop). Since the diagonal's tiles run apart (_nce_fwd_kernel) 3.9 at 3
# stages leaves 2-3 words spilled outside the loops (before: 6 reloaded every tile).
_FWD_SPLIT_128_VERSIONS = {"3.6": (3, 4), "3.9": (3,)}


def _prune_fwd(configs, named_args, version: str = TRITON_VERSION, **kwargs):
    levels = launch_arg(named_args, kwargs, "NUM_LEVELS")
    kept = _fit_operands(configs, named_args, kwargs)
    aligned = launch_arg(named_args, kwargs, "ALIGNED")
    tma = bool(launch_arg(named_args, kwargs, "USE_TMA"))
    if levels is not None and levels > 1:  # the spill-free ones (see above)
        # With the candidate mask, 128 x 64 and 64 x 128 spill a few words in the loop (static report): 64 x 64.
        masked = launch_arg(named_args, kwargs, "HAS_CAND_MASK")
        split_stages = _FWD_SPLIT_128_VERSIONS.get(version, ()) if tma and not masked else ()
        largest = 64 * 64 if masked else 128 * 128 if split_stages else 128 * 64
        kept = [c for c in kept if c.num_warps == 8 and (c.num_stages == 3 or (tma and not masked))
                and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= largest
                and (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128 or c.num_stages in split_stages)
                and (aligned or tma or c.kwargs["BLOCK_M"] == 64)]
    else:  # 128 x 64 is for the level groups; one level has 128 x 128
        kept = [c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (128, 64)]
    return kept or configs[-1:]


@gpu_autotune(_FWD_CONFIGS, key=["N", "D2", "NUM_LEVELS", "DOT_DTYPE", "HAS_DIAG", "HAS_IDS_A", "HAS_IDS_B",
                                   "ALIGNED", "HAS_CAND_MASK", "USE_TMA"],
              prune=_prune_fwd)
@triton.jit
def _nce_fwd_kernel(x, y, stride_x, stride_y, inv_x, inv_y, M, N, n_per_split, inv_temp,
                    ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, cmask, stride_cm, cm_col0,
                    part_m, part_l, part_t, part_pos, D0, D1, D2,
                    NUM_LEVELS: tl.constexpr, HAS_IDS_A: tl.constexpr, HAS_IDS_B: tl.constexpr,
                    HAS_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                    ALIGNED: tl.constexpr, HAS_CAND_MASK: tl.constexpr, USE_TMA: tl.constexpr,
                    SPLIT_FROM: tl.constexpr):
    """Streams candidates [split * n_per_split, +n_per_split) through the online logsumexp of a row tile.

    Grid (row tiles, splits): the candidate axis is split when the row tiles alone cannot fill the GPU;
    each split writes its partial state, part_* [SPLIT, L, M] in logit units z = s / tau (running max,
    sum of exp, sum of exp * z for E_p[z], the temperature's gradient; the positive's logit where the
    split holds it, else 0), merged afterwards in a fixed order (deterministic). The score is
    ((dot * a) * b) * (1 / tau), the order the backward's recomputation uses. HAS_CAND_MASK: candidate n
    of row m takes part only where the uint8 mask cmask[m * stride_cm + cm_col0 + n] is nonzero.
    """
    pid_s = tl.program_id(1)
    m_start = tl.program_id(0) * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    it = tl.load(inv_temp).to(tl.float32)
    m0 = tl.full([BLOCK_M], _NEG_INIT, tl.float32)
    l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    t0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    m1 = m0
    l1 = l0
    t1 = t0
    m2 = m0
    l2 = l0
    t2 = t0
    p0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    p1 = p0
    p2 = p0
    a0, a1, a2 = _load_levels(inv_x, M, offs_m, m_ok, NUM_LEVELS)
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)
    # USE_TMA: one descriptor pair per level (ALIGNED: one pair for all, D2 wide), made once per program.
    # SPLIT (TMA, several levels, candidate tiles at least SPLIT_FROM wide): two half-wide accumulators (see
    # _nce_fwd_level).
    SPLIT: tl.constexpr = USE_TMA and NUM_LEVELS > 1 and BLOCK_N >= SPLIT_FROM
    HALF: tl.constexpr = BLOCK_N // 2 if SPLIT else BLOCK_N
    xd0, xd1, xd2, yd0, yd1, yd2 = _level_descs(x, M, stride_x, y, N, stride_y, D0, D1, D2, BLOCK_M, HALF,
                                                BLOCK_D, NUM_LEVELS, ALIGNED, USE_TMA)
    if HAS_DIAG and SPLIT:
        # The tiles that hold this row tile's positives (columns m_start + diag_offset + [0, BLOCK_M), one or
        # two tiles of the split's grid) run last, unsplit as HALF-wide tiles with the mask's is_pos (as the
        # 3-level 128 x 64 tiles, spill-free); the others split, without the positive's comparison (POS_MODE 2): in the split 3-level 128 x 128 tile that comparison tile, live beside the
        # accumulators, made Triton 3.9 reload spilled words every tile. The order of the online update
        # changes, not what it sums: a row whose only candidate is its positive still gets lse = its logit.
        c_lo = tl.maximum(n_lo, m_start + diag_offset)
        c_hi = tl.minimum(n_hi, tl.minimum(M, m_start + BLOCK_M) + diag_offset)
        t_lo = n_lo + (tl.maximum(c_lo - n_lo, 0) // BLOCK_N) * BLOCK_N
        t_lo = tl.where(c_lo < c_hi, tl.minimum(t_lo, n_hi), n_hi)
        t_hi = tl.where(c_lo < c_hi, tl.minimum(n_lo + tl.cdiv(c_hi - n_lo, BLOCK_N) * BLOCK_N, n_hi), n_hi)
        for n0 in range(n_lo, t_lo, BLOCK_N):
            m0, l0, t0, p0, m1, l1, t1, p1, m2, l2, t2, p2 = _nce_fwd_tile(
                n0, xd0, xd1, xd2, yd0, yd1, yd2, stride_x, stride_y, offs_m, m_ok, m_start, n_hi, a0, a1, a2, inv_y,
                N, it, m0, l0, t0, p0, m1, l1, t1, p1, m2, l2, t2, p2, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                diag_offset, cmask, stride_cm, cm_col0, D0, D1, D2, NUM_LEVELS, HAS_IDS_A, HAS_IDS_B, HAS_DIAG,
                BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, HAS_CAND_MASK, USE_TMA, SPLIT, HALF, 2)
        for n0 in range(t_hi, n_hi, BLOCK_N):
            m0, l0, t0, p0, m1, l1, t1, p1, m2, l2, t2, p2 = _nce_fwd_tile(
                n0, xd0, xd1, xd2, yd0, yd1, yd2, stride_x, stride_y, offs_m, m_ok, m_start, n_hi, a0, a1, a2, inv_y,
                N, it, m0, l0, t0, p0, m1, l1, t1, p1, m2, l2, t2, p2, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                diag_offset, cmask, stride_cm, cm_col0, D0, D1, D2, NUM_LEVELS, HAS_IDS_A, HAS_IDS_B, HAS_DIAG,
                BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, HAS_CAND_MASK, USE_TMA, SPLIT, HALF, 2)
        for n0 in range(t_lo, t_hi, HALF):
            m0, l0, t0, p0, m1, l1, t1, p1, m2, l2, t2, p2 = _nce_fwd_tile(
                n0, xd0, xd1, xd2, yd0, yd1, yd2, stride_x, stride_y, offs_m, m_ok, m_start, n_hi, a0, a1, a2, inv_y,
                N, it, m0, l0, t0, p0, m1, l1, t1, p1, m2, l2, t2, p2, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                diag_offset, cmask, stride_cm, cm_col0, D0, D1, D2, NUM_LEVELS, HAS_IDS_A, HAS_IDS_B, HAS_DIAG,
                BLOCK_M, HALF, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, HAS_CAND_MASK, USE_TMA, False, HALF, 0)
    else:
        for n0 in range(n_lo, n_hi, BLOCK_N):
            m0, l0, t0, p0, m1, l1, t1, p1, m2, l2, t2, p2 = _nce_fwd_tile(
                n0, xd0, xd1, xd2, yd0, yd1, yd2, stride_x, stride_y, offs_m, m_ok, m_start, n_hi, a0, a1, a2, inv_y,
                N, it, m0, l0, t0, p0, m1, l1, t1, p1, m2, l2, t2, p2, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                diag_offset, cmask, stride_cm, cm_col0, D0, D1, D2, NUM_LEVELS, HAS_IDS_A, HAS_IDS_B, HAS_DIAG,
                BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, HAS_CAND_MASK, USE_TMA, SPLIT, HALF, 0)
    base = pid_s * NUM_LEVELS * M
    _store_levels(part_m + base, M, offs_m, m_ok, m0, m1, m2, NUM_LEVELS)
    _store_levels(part_l + base, M, offs_m, m_ok, l0, l1, l2, NUM_LEVELS)
    _store_levels(part_t + base, M, offs_m, m_ok, t0, t1, t2, NUM_LEVELS)
    if HAS_DIAG:
        _store_levels(part_pos + base, M, offs_m, m_ok, p0, p1, p2, NUM_LEVELS)


@triton.jit
def _coef(s, a, b, lse, g, zpos, it, valid, is_pos, HAS_DIAG: tl.constexpr):
    """(C = P a b, P s) of one level's [rows, cands] tile, P = g (p - [pos]) / tau.

    The positive's probability is exp(zpos), zpos = pos - lse computed once on the host from the
    forward's own logit of the positive (the negation of the loss term): where the loss is exactly 0
    (every candidate but the positive masked) p_pos is exactly 1 and the row's coefficients exactly 0,
    at any temperature, whatever rounding the recomputed score carries."""
    p = tl.exp(tl.where(valid, s * it - lse[:, None], _NEG_INIT))  # exactly 0 when masked
    if HAS_DIAG:
        p = tl.where(is_pos, tl.exp(zpos)[:, None], p)
    P = g[:, None] * (p - is_pos.to(tl.float32)) * it
    return P * a[:, None] * b[None, :], P * s


@triton.jit
def _level_coef(acc, lvl, inv_x, M, offs_m, m_ok, inv_y, N, offs_n, n_ok, lse, g, zpos, it, valid, is_pos,
                HAS_DIAG: tl.constexpr):
    """_coef of level lvl from its raw dot tile, the level's per-row / per-candidate values loaded here:
    in the MMA layout a thread holds a quarter of a 128-wide candidate vector, so three levels' scales
    loaded up front cost about 100 registers (the 3-level 128 x 64 tiles spilled)."""
    a = tl.load(inv_x + lvl * M + offs_m, mask=m_ok, other=0.0)
    b = tl.load(inv_y + lvl * N + offs_n, mask=n_ok, other=0.0)
    return _coef(acc * a[:, None] * b[None, :], a, b, tl.load(lse + lvl * M + offs_m, mask=m_ok, other=0.0),
                 tl.load(g + lvl * M + offs_m, mask=m_ok, other=0.0),
                 tl.load(zpos + lvl * M + offs_m, mask=m_ok, other=0.0), it, valid, is_pos, HAS_DIAG)


@triton.jit
def _park(e_buf, slot: tl.constexpr, Cr, Cc, e_off, e_ok, v, E_F32: tl.constexpr):
    """Parks the fp32 tile v in the coefficient block's memory, exactly: in slot `slot` when E is fp32, else
    (16-bit E) its high / low 16 bits in slots `slot`, `slot + 1`. Every element goes back to the same
    element's addresses (no other tile's), read back by _unpark after a barrier."""
    if E_F32:
        tl.store(e_buf + slot * Cr * Cc + e_off, v, mask=e_ok)
    else:
        e16 = e_buf.to(tl.pointer_type(tl.int16))
        bits = v.to(tl.int32, bitcast=True)
        tl.store(e16 + slot * Cr * Cc + e_off, (bits >> 16).to(tl.int16), mask=e_ok)
        tl.store(e16 + (slot + 1) * Cr * Cc + e_off, bits.to(tl.int16), mask=e_ok)


@triton.jit
def _unpark(e_buf, slot: tl.constexpr, Cr, Cc, e_off, e_ok, E_F32: tl.constexpr):
    """The tile _park left in slot `slot` (bit-exact)."""
    if E_F32:
        return tl.load(e_buf + slot * Cr * Cc + e_off, mask=e_ok, other=0.0)
    else:
        e16 = e_buf.to(tl.pointer_type(tl.int16))
        hi = tl.load(e16 + slot * Cr * Cc + e_off, mask=e_ok, other=0).to(tl.int32)
        lo = tl.load(e16 + (slot + 1) * Cr * Cc + e_off, mask=e_ok, other=0).to(tl.int32) & 0xFFFF
        return ((hi << 16) | lo).to(tl.float32, bitcast=True)


@triton.jit
def _opaque(v, ON: tl.constexpr, HAS_CAND_MASK: tl.constexpr):
    """v itself (ON: an int32 vector through an asm that the compiler may neither merge with another copy nor
    hoist; the interpreter returns v). The multi-level coefficient kernel passes each level's row indices
    through it: the pair-mask, index and offset tiles derived from them are then formed at each level step
    instead of being merged (CSE) with the first level's and held through the later D loops. Not with the
    candidate mask (HAS_CAND_MASK): its per-level 64-bit address tile then costs more than it saves (128 x 64
    spilled 52 -> 88 B under Triton 3.9, 624 -> 836 B under 3.6)."""
    if ON and not _INTERPRET and not HAS_CAND_MASK:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=False, pack=1)
    else:
        return v


@triton.jit
def _level_index(r0, Cr, c0, loc_m, loc_n, n_ok, HAS_CAND_MASK: tl.constexpr):
    """(loc_m, loc_n, m_ok, n_ok, offs_m, offs_n) of the tile for one level step of the parked path, the
    rows from an _opaque copy (see _opaque; an opaque copy of the candidates instead costs about a thousand
    spilled words: their MMA-layout vectors, 32 registers each at 128 wide, are then rebuilt per use)."""
    lm = _opaque(loc_m, True, HAS_CAND_MASK)
    return lm, loc_n, lm < Cr, n_ok, r0 + lm, c0 + loc_n


@triton.jit
def _e_block(loc_m, loc_n, Cr, Cc):
    """E's int32 offset tile and bounds mask for the tile's rows loc_m / candidates loc_n."""
    return loc_m[:, None] * Cc + loc_n[None, :], (loc_m < Cr)[:, None] & (loc_n < Cc)[None, :]


# Coefficient tiles. Each level's coefficients are formed when the dot crosses its width; with PARK (off by default,
# see PARK) each is parked in E's memory at once, so only the accumulator is live through the D loops (without:
# E_0's running sum too); each level's scales are loaded when used, and each level's pair mask from an _opaque copy
# of the row indices (else the compiler merges the levels' identical mask / index tiles into the first level's and
# holds them through the later D loops). Static sm_90a figures: 1 level 128 x 128 / 8 warps without spills; 3 levels
# (widths multiples of 64) 128 x 64 / 8 warps: 1 / 1 spilled words (Triton 3.9; 3.6: 16 / 16; 19 / 23 and 21 / 30
# before the _opaque rows), with PARK none (248 / 254 registers); with the candidate mask (rows not _opaque) 13 / 13
# and 3.6 150 / 180; none in the D loops. 64 x 128 / 8 spills about 100 words under 3.6; 128 x 128 (3 levels) about
# 390 / 410 (3.9) and 300 / 320 (3.6) with TMA, with PARK 220 / 260 and 160 / 190: not offered. Tried for 128 x 128,
# not kept: parking the raw accumulator across each level epilogue too (bit-exact, in the slots C^l takes next) --
# about 100 / 150 STL / LDL left (TMA, both versions), 16 more bytes of E traffic per score; an _opaque copy of the
# candidate indices (about 1,100 STL: their MMA-layout vectors rebuilt per use); two 64-wide accumulators on TMA
# (160 / 250). TMA (USE_TMA) for single levels only (at 3 levels 128 x 64 spilled in the loop before the _opaque
# rows: 12 / 13 STL / LDL with PARK under 3.9; now none in the loop: 1 / 1 words outside (3.9; 3.6 none), with PARK
# none -- not enabled, unaligned widths and the 64 x 64 tiles not checked).
_COEF_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": 64}, num_warps=w, num_stages=s)
                 for m, n, w, s in ((128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 8, 3), (64, 128, 4, 4),
                                    (64, 64, 4, 4), (64, 64, 8, 3), (64, 64, 8, 4))]
_COEF_1LEVEL = {(128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 4, 4), (64, 64, 4, 4)}
_COEF_LEVELS = {(128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 8, 4)}


def _cfg_key(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _prune_coef(configs, named_args, **kwargs):
    levels = launch_arg(named_args, kwargs, "NUM_LEVELS")
    aligned = launch_arg(named_args, kwargs, "ALIGNED")
    kept = _fit_operands(configs, named_args, kwargs)
    if levels is not None and levels > 1:
        kept = [c for c in kept if _cfg_key(c) in _COEF_LEVELS
                and (aligned or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)]
    else:
        kept = [c for c in kept if _cfg_key(c) in _COEF_1LEVEL]
    return kept or configs[-1:]


# rpart / cpart are sized for the smallest tile and a larger tile fills a prefix: zeroed before every
# tuning run and the final one, so no config's leftovers are summed.
@gpu_autotune(_COEF_CONFIGS, key=["Cr", "Cc", "D2", "NUM_LEVELS", "DOT_DTYPE", "HAS_DIAG", "HAS_IDS_A",
                                    "HAS_IDS_B", "ALIGNED", "HAS_CAND_MASK", "USE_TMA"],
              prune=_prune_coef, reset_to_zero=["rpart", "cpart"])
@triton.jit
def _nce_bwd_coef_kernel(x, y, stride_x, stride_y, inv_x, inv_y, M, N, r0, Cr, c0, Cc, lse, g, zpos, inv_temp,
                         ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, cmask, stride_cm, cm_col0,
                         e_buf, rpart, cpart, D0, D1, D2,
                         NUM_LEVELS: tl.constexpr, HAS_IDS_A: tl.constexpr, HAS_IDS_B: tl.constexpr,
                         HAS_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                         ALIGNED: tl.constexpr, HAS_CAND_MASK: tl.constexpr, USE_TMA: tl.constexpr,
                         PARK: tl.constexpr):
    """The backward's coefficient block of rows [r0, r0 + Cr) x candidates [c0, c0 + Cc).

    Recomputes the score tiles (all levels in one pass over D, as the forward), and writes
      e_buf [L, Cr, Cc]: E_k = sum_{l >= k} P^l a^l b^l, the coefficient of segment [d_{k-1}, d_k) of D in
        both gradient GEMMs (dX = E_k Y, dY = E_k^T X), in e_buf's dtype;
      rpart [cdiv(Cc, BLOCK_N), L, Cr], cpart [cdiv(Cr, BLOCK_M), L, Cc]: per-tile partial sums of P^l s^l
        over the tile's candidates / rows (the normalization's backward), summed on the host in a fixed
        order (deterministic, no atomics).
    lse, g (upstream gradient times level weight), zpos: [L, M] per query row. The candidate mask (as the
    forward's) is addressed with the global row / candidate indices, so every chunk reads its own block.
    PARK (several levels): each level's coefficient tile C^l but the last is parked in e_buf's own slots as
    soon as it is formed (_park: exact; 16-bit E takes two slots per tile, so 3 levels need a fourth, scratch
    slot) and the sums E_k are formed once, after the last D loop, in the same order as without PARK (E_0 =
    (C^0 + C^1) + C^2, E_1 = C^1 + C^2): bit-identical, and only the accumulator is live through the D loops.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    loc_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    loc_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = loc_m < Cr
    n_ok = loc_n < Cc
    offs_m = r0 + loc_m
    offs_n = c0 + loc_n
    m_start = r0 + pid_m * BLOCK_M
    n_start = c0 + pid_n * BLOCK_N
    xd0, xd1, xd2, yd0, yd1, yd2 = _level_descs(x, M, stride_x, y, N, stride_y, D0, D1, D2, BLOCK_M, BLOCK_N,
                                                BLOCK_D, NUM_LEVELS, ALIGNED, USE_TMA)
    it = tl.load(inv_temp).to(tl.float32)
    # One int32 offset tile for every E access (L Cr Cc < 2^31, checked by the launcher).
    e_off, e_ok = _e_block(loc_m, loc_n, Cr, Cc)
    e_ty = e_buf.dtype.element_ty
    rp = rpart + pid_n * NUM_LEVELS * Cr
    cp = cpart + pid_m * NUM_LEVELS * Cc
    # Each level's coefficients are formed as soon as the dot crosses its width (as in the forward), and
    # only E_0's running sum stays live through the later D loops: the live tiles are the accumulator and
    # E_0 whatever the level count (with three raw dot tiles live, 3 levels spilled above 64 x 64).
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PARK and NUM_LEVELS > 1:
        E_F32: tl.constexpr = e_ty == tl.float32
        SLOT1: tl.constexpr = 1 if E_F32 else 2  # where C^1 is parked (C^0 at slot 0)
        acc = _dot_range(acc, xd0, stride_x, offs_m, m_ok, yd0, stride_y, offs_n, n_ok,
                         0, D0, m_start, n_start, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, USE_TMA)
        lm, ln, mo, no, om, on = _level_index(r0, Cr, c0, loc_m, loc_n, n_ok, HAS_CAND_MASK)
        e_off, e_ok = _e_block(lm, ln, Cr, Cc)
        valid, is_pos = _pair_mask(om, mo, on, no, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                                   diag_offset, cmask, stride_cm, cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_DIAG, True,
                                   HAS_CAND_MASK)
        c0_, q0 = _level_coef(acc, 0, inv_x, M, om, mo, inv_y, N, on, no, lse, g, zpos, it, valid, is_pos,
                              HAS_DIAG)
        tl.store(rp + lm, tl.sum(q0, axis=1), mask=mo)
        tl.store(cp + ln, tl.sum(q0, axis=0), mask=no)
        _park(e_buf, 0, Cr, Cc, e_off, e_ok, c0_, E_F32)
        acc = _dot_range(acc, xd1, stride_x, offs_m, m_ok, yd1, stride_y, offs_n, n_ok,
                         D0, D1, m_start, n_start, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, USE_TMA)
        lm, ln, mo, no, om, on = _level_index(r0, Cr, c0, loc_m, loc_n, n_ok, HAS_CAND_MASK)
        e_off, e_ok = _e_block(lm, ln, Cr, Cc)
        valid, is_pos = _pair_mask(om, mo, on, no, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                                   diag_offset, cmask, stride_cm, cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_DIAG,
                                   True, HAS_CAND_MASK)
        c1_, q1 = _level_coef(acc, 1, inv_x, M, om, mo, inv_y, N, on, no, lse, g, zpos, it, valid, is_pos,
                              HAS_DIAG)
        tl.store(rp + Cr + lm, tl.sum(q1, axis=1), mask=mo)
        tl.store(cp + Cc + ln, tl.sum(q1, axis=0), mask=no)
        if NUM_LEVELS > 2:
            _park(e_buf, SLOT1, Cr, Cc, e_off, e_ok, c1_, E_F32)
            acc = _dot_range(acc, xd2, stride_x, offs_m, m_ok, yd2, stride_y, offs_n, n_ok,
                             D1, D2, m_start, n_start, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, USE_TMA)
            lm, ln, mo, no, om, on = _level_index(r0, Cr, c0, loc_m, loc_n, n_ok, HAS_CAND_MASK)
            e_off, e_ok = _e_block(lm, ln, Cr, Cc)
            valid, is_pos = _pair_mask(om, mo, on, no, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                                       diag_offset, cmask, stride_cm, cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_DIAG,
                                       True, HAS_CAND_MASK)
            e2, q2 = _level_coef(acc, 2, inv_x, M, om, mo, inv_y, N, on, no, lse, g, zpos, it, valid, is_pos,
                                 HAS_DIAG)
            tl.store(rp + 2 * Cr + lm, tl.sum(q2, axis=1), mask=mo)
            tl.store(cp + 2 * Cc + ln, tl.sum(q2, axis=0), mask=no)
            tl.debug_barrier()  # every thread's parked stores before any thread's reads (layouts may differ)
            c1_ = _unpark(e_buf, SLOT1, Cr, Cc, e_off, e_ok, E_F32)
            # Converted before the barrier: the three tiles wait for it in E's dtype (two 16-bit values per
            # register), not in fp32.
            e1 = (c1_ + e2).to(e_ty)
            e0 = ((_unpark(e_buf, 0, Cr, Cc, e_off, e_ok, E_F32) + c1_) + e2).to(e_ty)
            e2 = e2.to(e_ty)
            tl.debug_barrier()  # every read of the parked slots before they are overwritten
            tl.store(e_buf + 2 * Cr * Cc + e_off, e2, mask=e_ok)
        else:
            e1 = c1_.to(e_ty)
            tl.debug_barrier()
            e0 = (_unpark(e_buf, 0, Cr, Cc, e_off, e_ok, E_F32) + c1_).to(e_ty)
            tl.debug_barrier()
        tl.store(e_buf + Cr * Cc + e_off, e1, mask=e_ok)
        tl.store(e_buf + e_off, e0, mask=e_ok)
    else:
        acc = _dot_range(acc, xd0, stride_x, offs_m, m_ok, yd0, stride_y, offs_n, n_ok,
                         0, D0, m_start, n_start, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, USE_TMA)
        om = _opaque(offs_m, NUM_LEVELS > 1, HAS_CAND_MASK)  # see _opaque
        valid, is_pos = _pair_mask(om, m_ok, offs_n, n_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                                   diag_offset, cmask, stride_cm, cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_DIAG, True,
                                   HAS_CAND_MASK)
        e0, q0 = _level_coef(acc, 0, inv_x, M, offs_m, m_ok, inv_y, N, offs_n, n_ok, lse, g, zpos, it, valid,
                             is_pos, HAS_DIAG)
        tl.store(rp + loc_m, tl.sum(q0, axis=1), mask=m_ok)
        tl.store(cp + loc_n, tl.sum(q0, axis=0), mask=n_ok)
        if NUM_LEVELS > 1:
            acc = _dot_range(acc, xd1, stride_x, offs_m, m_ok, yd1, stride_y, offs_n, n_ok,
                             D0, D1, m_start, n_start, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, USE_TMA)
            om = _opaque(offs_m, NUM_LEVELS > 1, HAS_CAND_MASK)  # see _opaque
            valid, is_pos = _pair_mask(om, m_ok, offs_n, n_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                                       diag_offset, cmask, stride_cm, cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_DIAG,
                                       True, HAS_CAND_MASK)
            e1, q1 = _level_coef(acc, 1, inv_x, M, offs_m, m_ok, inv_y, N, offs_n, n_ok, lse, g, zpos, it, valid,
                                 is_pos, HAS_DIAG)
            tl.store(rp + Cr + loc_m, tl.sum(q1, axis=1), mask=m_ok)
            tl.store(cp + Cc + loc_n, tl.sum(q1, axis=0), mask=n_ok)
            e0 += e1
            if NUM_LEVELS > 2:
                acc = _dot_range(acc, xd2, stride_x, offs_m, m_ok, yd2, stride_y, offs_n, n_ok,
                                 D1, D2, m_start, n_start, BLOCK_D, DOT_DTYPE, DOT_PREC, ALIGNED, USE_TMA)
                om = _opaque(offs_m, NUM_LEVELS > 1, HAS_CAND_MASK)  # see _opaque
                valid, is_pos = _pair_mask(om, m_ok, offs_n, n_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                                           diag_offset, cmask, stride_cm, cm_col0, HAS_IDS_A, HAS_IDS_B, HAS_DIAG,
                                           True, HAS_CAND_MASK)
                e2, q2 = _level_coef(acc, 2, inv_x, M, offs_m, m_ok, inv_y, N, offs_n, n_ok, lse, g, zpos, it,
                                     valid, is_pos, HAS_DIAG)
                tl.store(rp + 2 * Cr + loc_m, tl.sum(q2, axis=1), mask=m_ok)
                tl.store(cp + 2 * Cc + loc_n, tl.sum(q2, axis=0), mask=n_ok)
                e0 += e2
                e1 += e2
                tl.store(e_buf + 2 * Cr * Cc + e_off, e2.to(e_ty), mask=e_ok)
            tl.store(e_buf + Cr * Cc + e_off, e1.to(e_ty), mask=e_ok)
        tl.store(e_buf + e_off, e0.to(e_ty), mask=e_ok)


@triton.jit
def _nce_acc_kernel(hi, lo, part, scale, src, n_rows, n_cols, stride_hi, stride_part, stride_src,
                    HAS_LO: tl.constexpr, SCALED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """hi (+ lo) += v for a [n_rows, n_cols] block, v = part (a GEMM's output), or with SCALED
    v = -scale[r] * src[r, c] (the normalization term). The sum is formed in fp32; with HAS_LO the
    low-precision pair (hi, lo) carries it as hi = round(sum), lo = round(sum - hi) (about 16 significant
    bits for bf16): the gradient of the streamed candidates accumulates across row chunks without an fp32
    copy of the whole gradient."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    msk = (offs_r < n_rows)[:, None] & (offs_c < n_cols)[None, :]
    r64 = offs_r[:, None].to(tl.int64)
    if SCALED:
        f = tl.load(scale + offs_r, mask=offs_r < n_rows, other=0.0)
        v = -f[:, None] * tl.load(src + r64 * stride_src + offs_c[None, :], mask=msk, other=0.0).to(tl.float32)
    else:
        v = tl.load(part + r64 * stride_part + offs_c[None, :], mask=msk, other=0.0).to(tl.float32)
    hp = hi + r64 * stride_hi + offs_c[None, :]
    acc = tl.load(hp, mask=msk, other=0.0).to(tl.float32)
    if HAS_LO:
        lp = lo + r64 * stride_hi + offs_c[None, :]
        acc = (acc + tl.load(lp, mask=msk, other=0.0).to(tl.float32)) + v
        h = acc.to(hi.dtype.element_ty)
        tl.store(hp, h, mask=msk)
        tl.store(lp, (acc - h.to(tl.float32)).to(lo.dtype.element_ty), mask=msk)
    else:
        tl.store(hp, (acc + v).to(hi.dtype.element_ty), mask=msk)


@triton.jit
def _nce_row_negative_bwd_kernel(x, neg, stride_x, inv_x, inv_neg, row_cos, lse, g, inv_temp,
                                 gbuf, rbuf, dneg, row_start, row_end, B, K, D, D0, D1, D2, cmask, stride_cm, cm_col0,
                                 NUM_LEVELS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                 HAS_CAND_MASK: tl.constexpr):
    """Per-row negatives: d x_i += sum_k P_ik a b neg_ik (into gbuf, R into rbuf) and
    d neg_ik += P_ik a b x_i - b^2 P_ik s_ik neg_ik (into the fp32 dneg), elementwise over D.
    Rows [row_start, row_end); gbuf [C, D], rbuf [L, C], dneg [C, K, D] hold that chunk. HAS_CAND_MASK:
    negative k of row i takes part only where cmask[i * stride_cm + cm_col0 + k] is nonzero (else P = 0)."""
    offs = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < row_end
    loc = offs - row_start
    C = row_end - row_start
    it = tl.load(inv_temp).to(tl.float32)
    for k in range(0, K):
        if HAS_CAND_MASK:
            keep = tl.load(cmask + offs.to(tl.int64) * stride_cm + cm_col0 + k, mask=ok, other=0) != 0
        for lvl in tl.static_range(NUM_LEVELS):
            a = tl.load(inv_x + lvl * B + offs, mask=ok, other=0.0)
            b = tl.load(inv_neg + lvl * B * K + offs * K + k, mask=ok, other=0.0)
            s = tl.load(row_cos + (lvl * B + offs) * K + k, mask=ok, other=0.0)
            P = tl.load(g + lvl * B + offs, mask=ok, other=0.0) * \
                tl.exp(s * it - tl.load(lse + lvl * B + offs, mask=ok, other=0.0)) * it
            if HAS_CAND_MASK:
                P = tl.where(keep, P, 0.0)
            tl.store(rbuf + lvl * C + loc, tl.load(rbuf + lvl * C + loc, mask=ok, other=0.0) + P * s, mask=ok)
            cx = P * a * b      # coefficient of neg_ik in d x_i, and of x_i in d neg_ik
            cn = b * b * P * s  # normalization term of d neg_ik
            hi = _level_span(lvl, D0, D1, D2)[1]
            # A level's terms touch the whole prefix [0, d_l).
            for d0 in range(0, hi, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                m2 = ok[:, None] & (offs_d < hi)[None, :]
                xp = offs[:, None].to(tl.int64) * stride_x + offs_d[None, :]
                np_ = (offs[:, None].to(tl.int64) * K + k) * stride_x + offs_d[None, :]
                gp = loc[:, None].to(tl.int64) * D + offs_d[None, :]
                dp = (loc[:, None].to(tl.int64) * K + k) * D + offs_d[None, :]
                xv = tl.load(x + xp, mask=m2, other=0.0).to(tl.float32)
                nv = tl.load(neg + np_, mask=m2, other=0.0).to(tl.float32)
                tl.store(gbuf + gp, tl.load(gbuf + gp, mask=m2, other=0.0) + cx[:, None] * nv, mask=m2)
                tl.store(dneg + dp, tl.load(dneg + dp, mask=m2, other=0.0) + cx[:, None] * xv - cn[:, None] * nv,
                         mask=m2)


# ---- host launchers ---------------------------------------------------------------------------

def _block_d(D: int) -> int:
    """The D step of the fixed-config launches: up to 64 (128-byte rows of bf16), at least 16 (tl.dot's K)."""
    return min(64, max(16, triton.next_power_of_2(D)))


def _interp_blocks(D: int) -> dict:
    """The one fixed config under the interpreter (the GPU configs are autotuned)."""
    return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=_block_d(D))


def _launch(kernel, grid, *args, _D: int, **kw):
    """Autotuned on a GPU (grid is a function of the chosen config); fixed blocks for width _D under the
    interpreter."""
    kernel[grid](*args, **kw, **interpreter_config(_interp_blocks(_D)))


# The small kernels (norms, own negatives) keep one fixed config: they are O(B D), not O(B^2 D).
def _blocks(D: int) -> tuple[int, int, int]:
    if INTERPRET:
        return 16, 16, _block_d(D)
    return 64, 64, 64


# Warps of the sm_90 compile test's fixed-config builds (the 64 x 64 tiles spill at 4).
_NUM_WARPS = 8
_SM_COUNT_DEFAULT = 132  # H100 SXM / H200, when no GPU is visible (static report)

# The narrowest forward candidate tile run as two halves at several levels with TMA (SPLIT in _nce_fwd_kernel):
# 128 (the GPU tiles); the tests lower it to reach that path with the interpreter's small tiles.
SPLIT_FROM = 128
# The multi-level coefficient kernel parks each level's coefficient tile in E's memory (_nce_bwd_coef_kernel's
# PARK): fewer registers, the same bits. Off by default: the register path keeps 128 x 64 at 1 / 1 (Triton 3.9; 3.6:
# 16 / 16) spilled words outside the D loops (once per tile), while PARK adds 16 bytes of E traffic per score at 3
# levels (C^0, C^1 written and read back: 69 GB at B = 65,536, about +7 ms in the model on the L2 -> SM channel) and
# bf16 at 3 levels a scratch slot (+16 MiB at the default chunks) against the 512 MB budget; on for an A/B run on a
# GPU. Tests compare the two.
PARK = False

# TMA loads in the score kernels' dot ranges where the operands qualify (_use_tma); False forces the pointer
# path everywhere (the tests run both). Not with a candidate mask: there the 1-level 128 x 128 tiles reload
# spilled words in the loop with TMA (forward under Triton 3.9, coefficients under 3.6) and not without it,
# and the 3-level tiles are 64 x 64 / 128 x 64 either way. The coefficient kernel: single levels only (see
# _COEF_CONFIGS).
TMA = True


def _use_tma(grp: tuple[int, ...], *ts: torch.Tensor) -> bool:
    """Whether the score kernels load these [rows, D] operands through device-side TMA descriptors: fp16 /
    bf16 (fp32 operands take the FMA dot, no HGMMA to feed), unit column stride, base address and row
    stride in bytes multiples of 16 (TMA's rules), and every level width of the group too (each level's
    loads start at the previous width: a box start must be 16-byte aligned). Sets the scratch allocator
    the descriptors need on a GPU."""
    return TMA and tma_operands(ts, 2, grp)


# Forward split of the candidate axis: None = as many splits as fill about two waves of the GPU.
FWD_SPLIT: int | None = None


def _groups(dims: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(dims[i:i + MAX_LEVELS]) for i in range(0, len(dims), MAX_LEVELS)]


def _aligned(grp: tuple[int, ...]) -> bool:
    """Every width of the group a multiple of 64, hence of every BLOCK_D (powers of 2 up to 64)."""
    return all(d % 64 == 0 for d in grp)


def _pad3(dims: tuple[int, ...]) -> tuple[int, int, int]:
    d = list(dims) + [dims[-1]] * (MAX_LEVELS - len(dims))
    return d[0], d[1], d[2]


def _spans(grp: tuple[int, ...]) -> list[tuple[int, int]]:
    """Segments of D within a level group: level k of the group adds [grp[k-1], grp[k]) (the first from 0)."""
    return [(0 if k == 0 else grp[k - 1], grp[k]) for k in range(len(grp))]


def prefix_inv_norms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """fp32 [L, N]: inverse L2 norm of every row's d_l-prefix (x is [N, D], unit stride in D)."""
    N = x.shape[0]
    out = torch.empty(len(dims), N, dtype=torch.float32, device=x.device)
    if N == 0:
        return out
    bm = 16 if INTERPRET else 32
    bd = _block_d(dims[-1])
    for gi, grp in enumerate(_groups(dims)):
        # Each group restarts at 0 so every level's sum covers its whole prefix.
        sub = torch.empty(len(grp), N, dtype=torch.float32, device=x.device)
        _nce_prefix_inv_norm_kernel[(triton.cdiv(N, bm),)](x, x.stride(0), sub, N, *_pad3(grp),
                                                           NUM_LEVELS=len(grp), BLOCK_M=bm, BLOCK_D=bd)
        out[gi * MAX_LEVELS: gi * MAX_LEVELS + len(grp)] = sub
    return out


def _sm_count(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return _SM_COUNT_DEFAULT


def _fwd_split(M: int, N: int, dev: torch.device) -> tuple[int, int]:
    """(splits, candidates per split): split the candidate axis only when the row tiles (128 rows, the
    largest forward tile) cannot fill two waves of SMs, and never below 1024 candidates a split."""
    if FWD_SPLIT is not None:
        split = max(1, min(FWD_SPLIT, N))
    else:
        split = max(1, min(triton.cdiv(2 * _sm_count(dev), triton.cdiv(M, 128)), triton.cdiv(N, 1024)))
    per = triton.cdiv(N, split)
    if split > 1 and FWD_SPLIT is None:
        per = triton.cdiv(per, 256) * 256  # whole tiles of every config
    return triton.cdiv(N, per), per


def _id_args(ids, placeholder: torch.Tensor):
    """(the four id pointers (rows' a, b, candidates' a, b; `ids` None: no masking) with `placeholder`, a
    tensor the kernels never read, for the absent ones, HAS_IDS_A, HAS_IDS_B)."""
    ids = (None,) * 4 if ids is None else tuple(ids)
    return [t if t is not None else placeholder for t in ids], ids[0] is not None, ids[1] is not None


def _cand_mask_u8(cand_mask, M: int, C: int):
    """The candidate mask [M, C] as the kernels read it (a uint8 view of the bool tensor, unit column stride),
    or None. Its shape is checked here too, whatever the validation setting: the kernels address it
    with its row stride and never read outside it."""
    if cand_mask is None:
        return None
    if cand_mask.dtype != torch.bool or tuple(cand_mask.shape) != (M, C):
        raise ValueError(f"candidate_mask must be a bool tensor of shape [{M}, {C}], got "
                         f"{str(cand_mask.dtype).replace('torch.', '')} {list(cand_mask.shape)}")
    if C > 1 and cand_mask.stride(1) != 1:
        cand_mask = cand_mask.contiguous()
    return cand_mask.view(torch.uint8)


def _mask_args(cmask, col0: int, placeholder: torch.Tensor):
    """(pointer, row stride, first column) of a candidate block in the mask, HAS_CAND_MASK; placeholder
    (never read) without a mask."""
    if cmask is None:
        return (placeholder, 0, 0), False
    return (cmask, cmask.stride(0), col0), True


def _fwd_parts(rows, cands, inv_rows, inv_cands, inv_temp, ids, diag_offset, grp, has_diag, dot, cmask=None,
               col0=0):
    """Partial online-softmax states [SPLIT, L, M] (m, l, t, pos) of rows against all of cands (cmask: the
    uint8 candidate mask, this block's columns starting at col0)."""
    M, D = rows.shape
    N = cands.shape[0]
    L = len(grp)
    split, per = _fwd_split(M, N, rows.device)
    f32 = dict(dtype=torch.float32, device=rows.device)
    pm, pl, pt = (torch.empty(split, L, M, **f32) for _ in range(3))
    pp = torch.zeros(split, L, M, **f32) if has_diag else pm
    idp, has_a, has_b = _id_args(ids, inv_rows)
    cm, has_cm = _mask_args(cmask, col0, inv_rows)
    _launch(_nce_fwd_kernel, lambda META: (triton.cdiv(M, META["BLOCK_M"]), split),
            rows, cands, rows.stride(0), cands.stride(0), inv_rows, inv_cands, M, N, per, inv_temp,
            *idp, diag_offset, *cm, pm, pl, pt, pp, *_pad3(grp),
            NUM_LEVELS=L, HAS_IDS_A=has_a, HAS_IDS_B=has_b, HAS_DIAG=has_diag, **dot, ALIGNED=_aligned(grp),
            HAS_CAND_MASK=has_cm, USE_TMA=not has_cm and _use_tma(grp, rows, cands), SPLIT_FROM=SPLIT_FROM,
            _D=D)
    return pm, pl, pt, (pp if has_diag else None)


def nce_fwd(rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset: int,
            inv_temp: torch.Tensor, dims: tuple[int, ...], *, cand_mask: torch.Tensor | None = None):
    """One direction of the loss, forward.

    rows [M, D]; cands [N, D] (positive of row i: cands[i + diag_offset]); shared_neg [S, D] or None
    (extra unmasked candidates of every row); row_neg [M, K, D] or None (own negatives of each row);
    ids_* int64 or None (rows' and candidates' query ids (a) and target ids (b));
    inv_temp fp32 [1]. Returns fp32 [L, M] tensors in logit units (cosine / tau): lse, pos (the positive's
    logit, the very value the max of its tile saw: loss = lse - pos is exactly 0 for a row whose only
    candidate is its positive), es (the p-weighted mean logit less the positive's, E_p[z] - z_pos), plus the fp32 norms [L, *] and the per-row
    negative cosines [L, M, K].
    cand_mask: bool [M, N + S + K] or None: False leaves candidate (cands, then shared_neg, then row_neg) out
    of the row's softmax; the positive takes part whatever it says.
    """
    M, D = rows.shape
    dev = rows.device
    L = len(dims)
    N = cands.shape[0]
    S = shared_neg.shape[0] if shared_neg is not None else 0
    bm, _, bd = _blocks(D)
    dot = dot_args(rows.dtype)
    inv_rows = prefix_inv_norms(rows, dims)
    inv_cands = prefix_inv_norms(cands, dims)
    inv_shared = prefix_inv_norms(shared_neg, dims) if shared_neg is not None else None
    K = row_neg.shape[1] if row_neg is not None else 0
    cmask = _cand_mask_u8(cand_mask, M, N + S + K)
    own_keep = cmask[:, N + S:].bool() if (cmask is not None and K) else None  # [M, K]
    inv_rowneg = prefix_inv_norms(row_neg.reshape(M * K, D), dims) if K else None
    f32 = dict(dtype=torch.float32, device=dev)
    row_cos = torch.empty(L, M, K, **f32)
    lse, pos, es = torch.empty(L, M, **f32), torch.empty(L, M, **f32), torch.empty(L, M, **f32)
    ids = (ids_a_r, ids_b_r, ids_a_c, ids_b_c)
    for gi, grp in enumerate(_groups(dims)):
        sl = slice(gi * MAX_LEVELS, gi * MAX_LEVELS + len(grp))
        if K:
            cos_g = torch.empty(len(grp), M, K, **f32)
            _nce_row_negative_cos_kernel[(triton.cdiv(M, bm),)](
                rows, rows.stride(0), row_neg, inv_rows[sl].contiguous(), inv_rowneg[sl].contiguous(), cos_g, M, K,
                *_pad3(grp), NUM_LEVELS=len(grp), BLOCK_M=bm, BLOCK_D=bd)
            row_cos[sl] = cos_g
        pm, pl, pt, pp = _fwd_parts(rows, cands, inv_rows[sl].contiguous(), inv_cands[sl].contiguous(), inv_temp,
                                    ids, diag_offset, grp, True, dot, cmask, 0)
        parts_m, parts_l, parts_t = [pm], [pl], [pt]
        if shared_neg is not None and shared_neg.shape[0] > 0:
            sm, sl_, st, _ = _fwd_parts(rows, shared_neg, inv_rows[sl].contiguous(), inv_shared[sl].contiguous(),
                                        inv_temp, None, 0, grp, False, dot, cmask, N)
            parts_m.append(sm), parts_l.append(sl_), parts_t.append(st)
        if K:  # the K own negatives of each row (masked by the candidate mask only) are one more part
            z = cos_g * inv_temp
            if own_keep is None:
                zm = z.max(dim=2).values
                e = torch.exp(z - zm[..., None])
            else:  # a left-out negative: probability exactly 0 (never a -inf logit, as in the kernels)
                zm = torch.where(own_keep, z, -1.0e30).max(dim=2).values
                e = torch.where(own_keep, torch.exp(z - zm[..., None]), 0.0)
            zc = torch.where(e > 0, z - zm[..., None], 0.0)  # a left-out negative: e = 0, never 0 * inf
            parts_m.append(zm[None]), parts_l.append(e.sum(2)[None]), parts_t.append((e * zc).sum(2)[None])
        # Merge the parts in a fixed order: deterministic. Each part's t is centred on its own max m_k;
        # es = E_p[z] - z_pos = (sum_k w_k (t_k + (m_k - mx) l_k)) / l + (mx - z_pos): no cancellation
        # of two logits of size 1 / tau (mx - z_pos is exactly 0 when the positive is the maximum).
        m_all = torch.cat(parts_m)
        mx = m_all.max(dim=0).values
        w = torch.exp(m_all - mx)
        l_all = torch.cat(parts_l)
        tot_l = (l_all * w).sum(0)
        lse[sl] = mx + torch.log(tot_l)
        pos[sl] = pp.sum(0)
        centred = torch.where(l_all > 0, torch.cat(parts_t) + (m_all - mx) * l_all, 0.0)
        es[sl] = (centred * w).sum(0) / tot_l + (mx - pos[sl])
    return lse, pos, es, inv_rows, inv_cands, inv_shared, inv_rowneg, row_cos


# Backward chunk sizes (rows x candidates; CAND_CHUNK / 2 with more than one level). What the backward holds
# beyond the inputs and gradients (bf16, B = 65,536, D = 3,072): the coefficient block E [L, 4096, 4096 / 2048]
# (32 MiB at 1 level, 48 MiB at 3; 64 with PARK's scratch slot, PARK on), the row chunk's bf16 residual (24 MiB), one GEMM output (<= 12 MiB, see
# GEMM_COLS) and the candidates' bf16 residual [B, D] (384 MiB): about 450-470 MiB. Every element of a gradient is
# accumulated B / CHUNK times (10 bytes each), so larger chunks move less memory. Launcher arguments override.
ROW_CHUNK = 4096
CAND_CHUNK = 4096
GEMM_COLS = 1536  # gradient GEMM outputs at most [chunk, 1536] (12 MB in bf16), still a full-rate shape


def _ranges(n: int, step: int):
    return [(s, min(n, s + step)) for s in range(0, n, step)]


class _Accumulator:
    """A gradient summed over many blocks at fp32-like precision: a row chunk's over the candidate
    chunks, a streamed input's (candidates, shared negatives) over the row chunks. fp32 inputs: in the
    gradient itself. bf16: the gradient (hi) plus a bf16 residual (lo), hi + lo carried to ~16
    significant bits for 2 extra bytes per element (half an fp32 copy). fp16 (whose residuals would
    underflow): an fp32 copy, converted at the end. Every add is one fused kernel (read the addend and
    hi / lo, write hi / lo: no fp32 temporaries)."""

    def __init__(self, like: torch.Tensor | None = None, out: torch.Tensor | None = None):
        self.out = out.zero_() if out is not None else torch.zeros_like(like)
        t = self.out
        self.lo = torch.zeros(t.shape, dtype=t.dtype, device=t.device) if t.dtype == torch.bfloat16 else None
        self.hi = torch.zeros(t.shape, dtype=torch.float32, device=t.device) \
            if t.dtype == torch.float16 else self.out

    def _run(self, r0, r1, lo, hi, part=None, scale=None, src=None):
        n_rows, n_cols = r1 - r0, hi - lo
        if n_rows == 0 or n_cols == 0:
            return
        h = self.hi[r0:r1, lo:hi]
        lo_t = self.lo[r0:r1, lo:hi] if self.lo is not None else h
        br, bc = (16, 16) if INTERPRET else (32, 128)
        scaled = part is None
        _nce_acc_kernel[(triton.cdiv(n_rows, br), triton.cdiv(n_cols, bc))](
            h, lo_t, src if scaled else part, scale if scaled else h, src if scaled else part, n_rows, n_cols,
            h.stride(0), part.stride(0) if not scaled else 0, src.stride(0) if scaled else 0,
            HAS_LO=self.lo is not None, SCALED=scaled, BLOCK_R=br, BLOCK_C=bc, num_warps=4)

    def add(self, r0, r1, lo, hi, part):
        """rows [r0, r1), columns [lo, hi) += part."""
        self._run(r0, r1, lo, hi, part=part)

    def add_scaled(self, r0, r1, lo, hi, scale, src):
        """rows [r0, r1), columns [lo, hi) -= scale[:, None] * src."""
        self._run(r0, r1, lo, hi, scale=scale, src=src)

    def result(self) -> torch.Tensor:
        if self.hi is not self.out:
            self.out.copy_(self.hi)
        return self.out


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (cuBLAS on a GPU; fp32 accumulation inside for every dtype)."""
    return torch.mm(a, b)


def nce_bwd(g: torch.Tensor, rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
            diag_offset: int, inv_temp: torch.Tensor, dims: tuple[int, ...], lse, pos, inv_rows, inv_cands,
            inv_shared, inv_rowneg, row_cos, *, row_chunk: int | None = None, cand_chunk: int | None = None,
            cand_mask: torch.Tensor | None = None):
    """Gradients of sum_{l,i} g[l, i] * loss^l_i w.r.t. rows, cands, shared_neg and row_neg
    (g fp32 [L, M]: upstream gradient times level weight; lse, pos [L, M] logits from the forward). Returns
    tensors in the inputs' dtypes (None for absent inputs).

    GEMM-shaped: per block of row_chunk rows x cand_chunk candidates, one Triton kernel recomputes the
    scores once and writes the coefficient block E_k per segment of D; then dX[rows] += E_k Y[cands] and
    dY[cands] += E_k^T X[rows] are matmuls (cuBLAS on a GPU), and the normalization terms row scalings.
    8 B N D FLOPs with the forward. Deterministic: fixed order of every sum, no atomics. Extra memory:
    one coefficient block, the row chunk's and (bf16 / fp16 inputs) the candidates' accumulator residuals
    (see _Accumulator and ROW_CHUNK). cand_mask: as nce_fwd's; every block reads its own rows and columns
    of it (global indices)."""
    M, D = rows.shape
    N = cands.shape[0]
    dev = rows.device
    row_chunk = int(row_chunk or ROW_CHUNK)
    # E holds one block per level of a group: narrower candidate chunks for more levels, the same memory.
    cand_chunk = int(cand_chunk or (CAND_CHUNK if len(dims) == 1 else max(1, CAND_CHUNK // 2)))
    if row_chunk < 1 or cand_chunk < 1:
        raise ValueError(f"row_chunk and cand_chunk must be >= 1, got {row_chunk}, {cand_chunk}")
    # The coefficient kernel addresses its [L, Cr, Cc] block with int32 offsets.
    n_cand = max(N, shared_neg.shape[0] if shared_neg is not None else 0, 1)
    # (MAX_LEVELS + 1 slots: PARK's scratch slot.)
    if (MAX_LEVELS + 1) * min(row_chunk, max(M, 1)) * min(cand_chunk, n_cand) >= 2 ** 31:
        raise ValueError(f"row_chunk * cand_chunk too large for the coefficient block: {row_chunk} x {cand_chunk} "
                         f"(at most {(2 ** 31 - 1) // (MAX_LEVELS + 1)} elements)")
    bm, _, bd = _blocks(D)
    dot = dot_args(rows.dtype)
    # fp16 coefficients P a b are tiny at large B (P ~ p / (B tau)) and would flush in fp16's exponent
    # range: fp16 inputs get fp32 coefficient blocks and fp32 GEMMs. bf16 has the range.
    e_dtype = torch.float32 if rows.dtype == torch.float16 else rows.dtype
    f32 = dict(dtype=torch.float32, device=dev)
    K = row_neg.shape[1] if row_neg is not None else 0
    S = shared_neg.shape[0] if shared_neg is not None else 0
    cmask = _cand_mask_u8(cand_mask, M, N + S + K)
    # The negation of the loss term, as the loss computes it: exactly 0 where the loss is.
    zpos = -(lse - pos)
    d_rows = torch.empty_like(rows)
    d_rowneg = torch.empty_like(row_neg) if row_neg is not None else None
    dummy = inv_rows
    ids, has_a, has_b = _id_args((ids_a_r, ids_b_r, ids_a_c, ids_b_c), dummy)
    groups = [(slice(gi * MAX_LEVELS, gi * MAX_LEVELS + len(grp)), grp) for gi, grp in enumerate(_groups(dims))]
    per_group = {gi: (lse[sl].contiguous(), g[sl].contiguous(), zpos[sl].contiguous(), inv_rows[sl].contiguous(),
                      inv_cands[sl].contiguous(), inv_shared[sl].contiguous() if S else None)
                 for gi, (sl, grp) in enumerate(groups)}
    # The streamed sides: (input, its inverse norms per group, has ids / diagonal, accumulator, R sums).
    sides = [(cands, 4, True, _Accumulator(cands), torch.zeros(len(dims), N, **f32), 0)]
    if S:
        sides.append((shared_neg, 5, False, _Accumulator(shared_neg), torch.zeros(len(dims), S, **f32), N))
    low = e_dtype != rows.dtype  # fp16: fp32 GEMM operands, converted per chunk

    for r0, r1 in _ranges(M, row_chunk):
        Cr = r1 - r0
        racc = _Accumulator(out=d_rows[r0:r1])
        rsum = torch.zeros(len(dims), Cr, **f32)
        xr = rows[r0:r1].float() if low else rows[r0:r1]
        if K:
            neg_cm, has_neg_cm = _mask_args(cmask, N + S, dummy)
            gbuf = torch.zeros(Cr, D, **f32)
            dneg = torch.zeros(Cr, K, D, **f32)
            for gi, (sl, grp) in enumerate(groups):
                rbuf = torch.zeros(len(grp), Cr, **f32)
                _nce_row_negative_bwd_kernel[(triton.cdiv(Cr, bm),)](
                    rows, row_neg, rows.stride(0), per_group[gi][3], inv_rowneg[sl].contiguous(),
                    row_cos[sl].contiguous(), per_group[gi][0], per_group[gi][1], inv_temp, gbuf, rbuf, dneg,
                    r0, r1, M, K, D, *_pad3(grp), *neg_cm, NUM_LEVELS=len(grp), BLOCK_M=bm, BLOCK_D=bd,
                    HAS_CAND_MASK=has_neg_cm)
                rsum[sl] += rbuf
            d_rowneg[r0:r1] = dneg
            racc.add(0, Cr, 0, D, gbuf)
            del dneg, gbuf
        for y, inv_idx, masked, acc, rc, col0 in sides:
            n = y.shape[0]
            cm, has_cm = _mask_args(cmask, col0, dummy)
            for c0, c1 in _ranges(n, cand_chunk):
                Cc = c1 - c0
                yc = y[c0:c1].float() if low else y[c0:c1]
                for gi, (sl, grp) in enumerate(groups):
                    lse_g, g_g, z_g, ir, _, _ = per_group[gi]
                    iy = per_group[gi][inv_idx]
                    L = len(grp)
                    bm_c, bn_c = (16, 16) if INTERPRET else (64, 64)  # the smallest config: buffer sizes
                    # PARK (several levels): 16-bit E parks each fp32 tile in two slots, so 3 levels take
                    # a fourth, scratch slot (+ Cr Cc 2 bytes); only e[:L] is read.
                    park = PARK and L > 1
                    slots = L + 1 if park and L == 3 and e_dtype.itemsize == 2 else L
                    e = torch.empty(slots, Cr, Cc, dtype=e_dtype, device=dev)
                    rpart = torch.empty(triton.cdiv(Cc, bn_c), L, Cr, **f32)
                    cpart = torch.empty(triton.cdiv(Cr, bm_c), L, Cc, **f32)
                    idp = ids if masked else (dummy,) * 4

                    def grid(META, Cr=Cr, Cc=Cc):
                        return (triton.cdiv(Cr, META["BLOCK_M"]), triton.cdiv(Cc, META["BLOCK_N"]))

                    # rpart / cpart are sized for the smallest tile; a larger tile fills a prefix of them.
                    rpart.zero_()
                    cpart.zero_()
                    _launch(_nce_bwd_coef_kernel, grid, rows, y, rows.stride(0), y.stride(0), ir, iy, M, n,
                            r0, Cr, c0, Cc, lse_g, g_g, z_g, inv_temp, *idp, diag_offset if masked else 0, *cm,
                            e, rpart, cpart, *_pad3(grp), NUM_LEVELS=L, HAS_IDS_A=masked and has_a,
                            HAS_IDS_B=masked and has_b, HAS_DIAG=masked, **dot,
                            ALIGNED=_aligned(grp), HAS_CAND_MASK=has_cm,
                            USE_TMA=L == 1 and not has_cm and _use_tma(grp, rows, y), PARK=park, _D=D)
                    rsum[sl] += rpart.sum(0)
                    rc[sl, c0:c1] += cpart.sum(0)
                    for k, (lo, hi) in enumerate(_spans(grp)):
                        for a, b in ((a, min(hi, a + GEMM_COLS)) for a in range(lo, hi, GEMM_COLS)):
                            racc.add(0, Cr, a, b, _mm(e[k], yc[:, a:b]))
                            acc.add(c0, c1, a, b, _mm(e[k].t(), xr[:, a:b]))
                    del e
        # The rows' normalization: - sum_{l >= k} a_l^2 R^l x on segment k.
        a2r = inv_rows[:, r0:r1] * inv_rows[:, r0:r1] * rsum
        for sl, grp in groups:
            f = a2r[sl].flip(0).cumsum(0).flip(0)
            for k, (lo, hi) in enumerate(_spans(grp)):
                racc.add_scaled(0, Cr, lo, hi, f[k].contiguous(), rows[r0:r1, lo:hi])
        racc.result()
        del racc
    outs = []
    for y, inv_idx, masked, acc, rc, _ in sides:
        inv_y = inv_cands if inv_idx == 4 else inv_shared
        b2r = inv_y * inv_y * rc
        for sl, grp in groups:
            f = b2r[sl].flip(0).cumsum(0).flip(0).contiguous()
            for k, (lo, hi) in enumerate(_spans(grp)):
                for c0, c1 in _ranges(y.shape[0], cand_chunk):
                    acc.add_scaled(c0, c1, lo, hi, f[k, c0:c1], y[c0:c1, lo:hi])
        outs.append(acc.result())
    d_cands = outs[0]
    d_shared = outs[1] if S else None
    return d_rows, d_cands, d_shared, d_rowneg
