"""Tiled large-batch NCE (InfoNCE) loss with MRL levels: Triton kernels and host launchers.

One "direction" of the loss: rows x_i (queries) against candidates y_j (targets, then optionally
shared negatives) plus K per-row negatives. For every MRL level l with prefix width d_l:

    s^l_ij = <x_i[:d_l], y_j[:d_l]> * a^l_i * b^l_j          (cosine; a, b = inverse prefix norms)
    lse^l_i = logsumexp over the unmasked candidates of s^l_ij / tau
    loss_i  = sum_l w_l * (lse^l_i - s^l_{i,pos(i)} / tau)

Nothing of size [rows, candidates] is ever stored: the forward streams candidate tiles through an
online logsumexp in fp32 and keeps, per row and level, the running max / sum / p-weighted cosine.
ALL levels share one pass over D: the partial dot products of the d_0-prefix are the start of the
d_1-prefix ones, so a tile's dots are snapshotted at every level boundary.

Backward (recomputes the tiles): with P^l_ij = g^l_i (p^l_ij - [j == pos(i)]) / tau,
    d x_i = sum_l a_i ( sum_j P^l_ij b_j y_j[:d_l]  -  a_i R^l_i x_i[:d_l] ),  R^l_i = sum_j P^l_ij s^l_ij
(the second term is the L2 normalization's backward); d y_j is the same with the roles swapped.
One kernel serves both sides ("owner" = the rows whose gradient a program accumulates, "other" =
the tiles it streams): programs own disjoint rows and read-modify-write their own fp32 gradient
rows, so the backward is deterministic (no atomics).

Masking: candidate j != pos(i) is dropped from row i when ids_a or ids_b match. A dropped
candidate gets probability exactly 0 through `tl.where` (never a -inf logit), so a learnable
temperature never sees inf - inf.

At most 3 levels per pass (MAX_LEVELS); the launchers run longer MRL lists in groups of 3.

Cost: forward 2 B N D FLOPs; backward recomputes the dots once for the rows' gradient and once for the
candidates' (2 + 2 + 2 + 2 B N D), so 10 B N D in all against the 8 B N D of a backward that shares one
recomputation. The fp32 gradient rows are read-modified-written once per streamed tile, which at large D
is memory traffic a GEMM-shaped backward (materialize a bounded [rows-chunk, candidate-chunk] block of P
in bf16, then two GEMMs) would avoid: the next step once this is measured on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._dtypes import DOT_FP16, dot_code, next_pow2

MAX_LEVELS = 3
_DOT_TF32 = 3  # a fourth operand code beside _dtypes' DOT_FP32 / DOT_FP16 / DOT_BF16
_NEG_INIT = tl.constexpr(-1.0e30)  # finite "minus infinity" of the online max: exp(_NEG_INIT - _NEG_INIT) = 1, never NaN


# ---- device helpers ---------------------------------------------------------------------------

@triton.jit
def _mma(acc, a, b, DOT: tl.constexpr):
    if DOT == 1:
        acc += tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT == 2:
        acc += tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT == 3:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def _dot_range(acc, x, stride_x, offs_x, x_ok, y, stride_y, offs_y, y_ok, lo, hi,
               BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """acc[m, n] += <x[offs_x[m], lo:hi], y[offs_y[n], lo:hi]>."""
    for d0 in range(lo, hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < hi
        xt = tl.load(x + offs_x[:, None].to(tl.int64) * stride_x + offs_d[None, :],
                     mask=x_ok[:, None] & d_ok[None, :], other=0.0)
        yt = tl.load(y + offs_y[None, :].to(tl.int64) * stride_y + offs_d[:, None],
                     mask=y_ok[None, :] & d_ok[:, None], other=0.0)
        acc = _mma(acc, xt, yt, DOT)
    return acc


@triton.jit
def _level_dots(x, stride_x, offs_x, x_ok, y, stride_y, offs_y, y_ok, D0, D1, D2,
                NUM_LEVELS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """Raw dot tiles of the d_0, d_1, d_2 prefixes in one pass over D."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _dot_range(acc, x, stride_x, offs_x, x_ok, y, stride_y, offs_y, y_ok, 0, D0, BLOCK_D, DOT)
    dot0 = acc
    dot1 = acc
    dot2 = acc
    if NUM_LEVELS > 1:
        acc = _dot_range(acc, x, stride_x, offs_x, x_ok, y, stride_y, offs_y, y_ok, D0, D1, BLOCK_D, DOT)
        dot1 = acc
        dot2 = acc
    if NUM_LEVELS > 2:
        acc = _dot_range(acc, x, stride_x, offs_x, x_ok, y, stride_y, offs_y, y_ok, D1, D2, BLOCK_D, DOT)
        dot2 = acc
    return dot0, dot1, dot2


@triton.jit
def _online_update(m, l, t, z, s, valid):
    """One tile of the online logsumexp: running max m, sum l = sum exp(z - m), t = sum exp(z - m) s."""
    m_new = tl.maximum(m, tl.max(tl.where(valid, z, _NEG_INIT), axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(tl.where(valid, z - m_new[:, None], _NEG_INIT))  # exactly 0 when masked
    return m_new, l * alpha + tl.sum(p, axis=1), t * alpha + tl.sum(p * s, axis=1)


@triton.jit
def _pair_mask(offs_r, r_ok, offs_c, c_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset,
               HAS_IDS_A: tl.constexpr, HAS_IDS_B: tl.constexpr, HAS_DIAG: tl.constexpr,
               ROW_FIRST: tl.constexpr):
    """(valid, is_pos) of query rows offs_r x candidates offs_c, laid out [R, C] when ROW_FIRST
    else [C, R]. Candidate j != pos(i) is dropped when the ids of i and j match."""
    if ROW_FIRST:
        r2 = offs_r[:, None]
        c2 = offs_c[None, :]
        valid = r_ok[:, None] & c_ok[None, :]
    else:
        r2 = offs_r[None, :]
        c2 = offs_c[:, None]
        valid = c_ok[:, None] & r_ok[None, :]
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
        valid = valid & ((drop == 0) | is_pos)
        is_pos = is_pos & valid
    else:
        is_pos = r2 < 0
        is_pos = is_pos & valid
    return valid, is_pos


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
def _prefix_inv_norm_kernel(x, stride_x, out, N, D0, D1, D2, NUM_LEVELS: tl.constexpr,
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
def _row_negative_cos_kernel(x, stride_x, neg, inv_x, inv_neg, cos, B, K, D0, D1, D2,
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


@triton.jit
def _fwd_kernel(x, y, stride_x, stride_y, inv_x, inv_y, M, N, inv_temp,
                ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset, row_cos, K,
                state_m, state_l, state_t, pos, D0, D1, D2,
                NUM_LEVELS: tl.constexpr, HAS_IDS_A: tl.constexpr, HAS_IDS_B: tl.constexpr,
                HAS_DIAG: tl.constexpr, HAS_ROW_NEG: tl.constexpr, INIT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """Streams candidate tiles y through the online logsumexp of rows x, all levels at once.

    state_m/l/t [L, M]: running max, sum of exp, and sum of exp * cosine (for E_p[s], the
    temperature's gradient); carried between launches (targets, then shared negatives).
    pos [L, M]: cosine of the positive, accumulated from the tile that holds it.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    it = tl.load(inv_temp).to(tl.float32)
    if INIT:
        m0 = tl.full([BLOCK_M], _NEG_INIT, tl.float32)
        l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
        t0 = tl.zeros([BLOCK_M], dtype=tl.float32)
        m1 = m0
        l1 = l0
        t1 = t0
        m2 = m0
        l2 = l0
        t2 = t0
    else:
        m0 = tl.load(state_m + offs_m, mask=m_ok, other=_NEG_INIT)
        l0 = tl.load(state_l + offs_m, mask=m_ok, other=0.0)
        t0 = tl.load(state_t + offs_m, mask=m_ok, other=0.0)
        m1 = m0
        l1 = l0
        t1 = t0
        m2 = m0
        l2 = l0
        t2 = t0
        if NUM_LEVELS > 1:
            m1 = tl.load(state_m + M + offs_m, mask=m_ok, other=_NEG_INIT)
            l1 = tl.load(state_l + M + offs_m, mask=m_ok, other=0.0)
            t1 = tl.load(state_t + M + offs_m, mask=m_ok, other=0.0)
        if NUM_LEVELS > 2:
            m2 = tl.load(state_m + 2 * M + offs_m, mask=m_ok, other=_NEG_INIT)
            l2 = tl.load(state_l + 2 * M + offs_m, mask=m_ok, other=0.0)
            t2 = tl.load(state_t + 2 * M + offs_m, mask=m_ok, other=0.0)
    if HAS_ROW_NEG:
        # The K own negatives of each row (cosines precomputed): never masked.
        for k in range(0, K):
            c0 = tl.load(row_cos + offs_m * K + k, mask=m_ok, other=0.0)
            m0, l0, t0 = _online_update(m0, l0, t0, (c0 * it)[:, None], c0[:, None], m_ok[:, None])
            if NUM_LEVELS > 1:
                c1 = tl.load(row_cos + (M + offs_m) * K + k, mask=m_ok, other=0.0)
                m1, l1, t1 = _online_update(m1, l1, t1, (c1 * it)[:, None], c1[:, None], m_ok[:, None])
            if NUM_LEVELS > 2:
                c2 = tl.load(row_cos + (2 * M + offs_m) * K + k, mask=m_ok, other=0.0)
                m2, l2, t2 = _online_update(m2, l2, t2, (c2 * it)[:, None], c2[:, None], m_ok[:, None])
    a0, a1, a2 = _load_levels(inv_x, M, offs_m, m_ok, NUM_LEVELS)
    p0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    p1 = p0
    p2 = p0
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dot0, dot1, dot2 = _level_dots(x, stride_x, offs_m, m_ok, y, stride_y, offs_n, n_ok, D0, D1, D2,
                                       NUM_LEVELS, BLOCK_M, BLOCK_N, BLOCK_D, DOT)
        valid, is_pos = _pair_mask(offs_m, m_ok, offs_n, n_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                                   diag_offset, HAS_IDS_A, HAS_IDS_B, HAS_DIAG, True)
        s0 = dot0 * a0[:, None] * tl.load(inv_y + offs_n, mask=n_ok, other=0.0)[None, :]
        m0, l0, t0 = _online_update(m0, l0, t0, s0 * it, s0, valid)
        if HAS_DIAG:
            p0 += tl.sum(tl.where(is_pos, s0, 0.0), axis=1)
        if NUM_LEVELS > 1:
            s1 = dot1 * a1[:, None] * tl.load(inv_y + N + offs_n, mask=n_ok, other=0.0)[None, :]
            m1, l1, t1 = _online_update(m1, l1, t1, s1 * it, s1, valid)
            if HAS_DIAG:
                p1 += tl.sum(tl.where(is_pos, s1, 0.0), axis=1)
        if NUM_LEVELS > 2:
            s2 = dot2 * a2[:, None] * tl.load(inv_y + 2 * N + offs_n, mask=n_ok, other=0.0)[None, :]
            m2, l2, t2 = _online_update(m2, l2, t2, s2 * it, s2, valid)
            if HAS_DIAG:
                p2 += tl.sum(tl.where(is_pos, s2, 0.0), axis=1)
    _store_levels(state_m, M, offs_m, m_ok, m0, m1, m2, NUM_LEVELS)
    _store_levels(state_l, M, offs_m, m_ok, l0, l1, l2, NUM_LEVELS)
    _store_levels(state_t, M, offs_m, m_ok, t0, t1, t2, NUM_LEVELS)
    if HAS_DIAG:
        _store_levels(pos, M, offs_m, m_ok, p0, p1, p2, NUM_LEVELS)


@triton.jit
def _coef(dot, a_own, b_oth, lse, g, it, valid, is_pos, OWNER_IS_ROW: tl.constexpr):
    """(C = P * a * b, P * s) for one level, with P = g (p - [pos]) / tau in the owner x other layout.

    The score is recomputed in the forward's order of multiplication, (dot * a_row) * b_cand, in both
    layouts: p = exp(s / tau - lse) must be exactly 1 for a row whose only candidate is its positive,
    and a one-ulp difference in s is amplified by 1/tau (twice, through the coefficient) otherwise."""
    if OWNER_IS_ROW:
        s = dot * a_own[:, None] * b_oth[None, :]
        lse2 = lse[:, None]
        g2 = g[:, None]
    else:
        s = dot * b_oth[None, :] * a_own[:, None]
        lse2 = lse[None, :]
        g2 = g[None, :]
    p = tl.exp(tl.where(valid, s * it - lse2, _NEG_INIT))  # exactly 0 when masked
    P = g2 * (p - is_pos.to(tl.float32)) * it
    return P * a_own[:, None] * b_oth[None, :], tl.sum(P * s, axis=1)


@triton.jit
def _grad_range(gbuf, loc, o_ok, coef, y, stride_y, offs_y, y_ok, lo, hi, D,
                BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """gbuf[loc, lo:hi] += coef @ y[oth, lo:hi] (fp32 read-modify-write of the owner's own rows)."""
    for d0 in range(lo, hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < hi
        yt = tl.load(y + offs_y[:, None].to(tl.int64) * stride_y + offs_d[None, :],
                     mask=y_ok[:, None] & d_ok[None, :], other=0.0)
        gp = gbuf + loc[:, None].to(tl.int64) * D + offs_d[None, :]
        gm = o_ok[:, None] & d_ok[None, :]
        acc = tl.load(gp, mask=gm, other=0.0)
        acc = _mma(acc, coef, yt, DOT)
        tl.store(gp, acc, mask=gm)


@triton.jit
def _finalize_range(gbuf, loc, x_own, stride_own, offs_o, o_ok, c, lo, hi, D, BLOCK_D: tl.constexpr):
    """gbuf[loc, lo:hi] -= c * x[own, lo:hi] (the L2 normalization's backward)."""
    for d0 in range(lo, hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        gm = o_ok[:, None] & (offs_d < hi)[None, :]
        gp = gbuf + loc[:, None].to(tl.int64) * D + offs_d[None, :]
        xv = tl.load(x_own + offs_o[:, None].to(tl.int64) * stride_own + offs_d[None, :],
                     mask=gm, other=0.0).to(tl.float32)
        tl.store(gp, tl.load(gp, mask=gm, other=0.0) - c[:, None] * xv, mask=gm)


@triton.jit
def _bwd_kernel(x_own, y_oth, stride_own, stride_oth, inv_own, inv_oth, M_own, N_oth, M_rows,
                own_start, own_end, lse, g, inv_temp, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset,
                gbuf, rbuf, D, D0, D1, D2,
                OWNER_IS_ROW: tl.constexpr, NUM_LEVELS: tl.constexpr, HAS_IDS_A: tl.constexpr,
                HAS_IDS_B: tl.constexpr, HAS_DIAG: tl.constexpr, FINALIZE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
                GRAD_DOT: tl.constexpr):
    """Gradient of the owner rows (query rows when OWNER_IS_ROW, else candidates) over all other tiles.

    Programs cover owners [own_start, own_end) (a chunk: the fp32 buffers are chunk-sized, so the extra
    memory stays bounded whatever B). gbuf [C, D] fp32 accumulates sum_l a_l sum_j P^l b_l y_j;
    rbuf [L, C] accumulates R^l = sum_j P^l s^l; with FINALIZE the normalization term
    -a_l^2 R^l x[:d_l] is applied (C = own_end - own_start).
    lse [L, M_rows] and g [L, M_rows] (the upstream gradient times the level weight) are per query row.
    """
    offs_o = own_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = offs_o < own_end
    loc = offs_o - own_start
    C = own_end - own_start
    it = tl.load(inv_temp).to(tl.float32)
    a0, a1, a2 = _load_levels(inv_own, M_own, offs_o, o_ok, NUM_LEVELS)
    r0, r1, r2 = _load_levels(rbuf, C, loc, o_ok, NUM_LEVELS)
    if OWNER_IS_ROW:
        lse0, lse1, lse2 = _load_levels(lse, M_rows, offs_o, o_ok, NUM_LEVELS)
        g0, g1, g2 = _load_levels(g, M_rows, offs_o, o_ok, NUM_LEVELS)
    for n0 in range(0, N_oth, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_oth
        if OWNER_IS_ROW:
            valid, is_pos = _pair_mask(offs_o, o_ok, offs_n, n_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                                       diag_offset, HAS_IDS_A, HAS_IDS_B, HAS_DIAG, True)
        else:
            valid, is_pos = _pair_mask(offs_n, n_ok, offs_o, o_ok, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
                                       diag_offset, HAS_IDS_A, HAS_IDS_B, HAS_DIAG, False)
            lse0 = tl.load(lse + offs_n, mask=n_ok, other=0.0)
            g0 = tl.load(g + offs_n, mask=n_ok, other=0.0)
            lse1 = lse0
            g1 = g0
            lse2 = lse0
            g2 = g0
            if NUM_LEVELS > 1:
                lse1 = tl.load(lse + M_rows + offs_n, mask=n_ok, other=0.0)
                g1 = tl.load(g + M_rows + offs_n, mask=n_ok, other=0.0)
            if NUM_LEVELS > 2:
                lse2 = tl.load(lse + 2 * M_rows + offs_n, mask=n_ok, other=0.0)
                g2 = tl.load(g + 2 * M_rows + offs_n, mask=n_ok, other=0.0)
        dot0, dot1, dot2 = _level_dots(x_own, stride_own, offs_o, o_ok, y_oth, stride_oth, offs_n, n_ok,
                                       D0, D1, D2, NUM_LEVELS, BLOCK_M, BLOCK_N, BLOCK_D, DOT)
        b0 = tl.load(inv_oth + offs_n, mask=n_ok, other=0.0)
        c0, q0 = _coef(dot0, a0, b0, lse0, g0, it, valid, is_pos, OWNER_IS_ROW)
        r0 += q0
        e0 = c0
        if NUM_LEVELS > 1:
            b1 = tl.load(inv_oth + N_oth + offs_n, mask=n_ok, other=0.0)
            c1, q1 = _coef(dot1, a1, b1, lse1, g1, it, valid, is_pos, OWNER_IS_ROW)
            r1 += q1
            e1 = c1
            e0 += c1
        if NUM_LEVELS > 2:
            b2 = tl.load(inv_oth + 2 * N_oth + offs_n, mask=n_ok, other=0.0)
            c2, q2 = _coef(dot2, a2, b2, lse2, g2, it, valid, is_pos, OWNER_IS_ROW)
            r2 += q2
            e2 = c2
            e1 += c2
            e0 += c2
        # Segment [d_{k-1}, d_k) of D receives the coefficients of every level l >= k.
        _grad_range(gbuf, loc, o_ok, e0, y_oth, stride_oth, offs_n, n_ok, 0, D0, D, BLOCK_D, GRAD_DOT)
        if NUM_LEVELS > 1:
            _grad_range(gbuf, loc, o_ok, e1, y_oth, stride_oth, offs_n, n_ok, D0, D1, D, BLOCK_D, GRAD_DOT)
        if NUM_LEVELS > 2:
            _grad_range(gbuf, loc, o_ok, e2, y_oth, stride_oth, offs_n, n_ok, D1, D2, D, BLOCK_D, GRAD_DOT)
    if FINALIZE:
        f0 = a0 * a0 * r0
        if NUM_LEVELS > 1:
            f1 = a1 * a1 * r1
            f0 += f1
        if NUM_LEVELS > 2:
            f2 = a2 * a2 * r2
            f1 += f2
            f0 += f2
        _finalize_range(gbuf, loc, x_own, stride_own, offs_o, o_ok, f0, 0, D0, D, BLOCK_D)
        if NUM_LEVELS > 1:
            _finalize_range(gbuf, loc, x_own, stride_own, offs_o, o_ok, f1, D0, D1, D, BLOCK_D)
        if NUM_LEVELS > 2:
            _finalize_range(gbuf, loc, x_own, stride_own, offs_o, o_ok, f2, D1, D2, D, BLOCK_D)
    else:
        _store_levels(rbuf, C, loc, o_ok, r0, r1, r2, NUM_LEVELS)


@triton.jit
def _row_negative_bwd_kernel(x, neg, stride_x, inv_x, inv_neg, row_cos, lse, g, inv_temp,
                             gbuf, rbuf, dneg, row_start, row_end, B, K, D, D0, D1, D2,
                             NUM_LEVELS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-row negatives: d x_i += sum_k P_ik a b neg_ik (into gbuf, R into rbuf) and
    d neg_ik += P_ik a b x_i - b^2 P_ik s_ik neg_ik (into the fp32 dneg), elementwise over D.
    Rows [row_start, row_end); gbuf [C, D], rbuf [L, C], dneg [C, K, D] hold that chunk."""
    offs = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < row_end
    loc = offs - row_start
    C = row_end - row_start
    it = tl.load(inv_temp).to(tl.float32)
    for k in range(0, K):
        for lvl in tl.static_range(NUM_LEVELS):
            a = tl.load(inv_x + lvl * B + offs, mask=ok, other=0.0)
            b = tl.load(inv_neg + lvl * B * K + offs * K + k, mask=ok, other=0.0)
            s = tl.load(row_cos + (lvl * B + offs) * K + k, mask=ok, other=0.0)
            P = tl.load(g + lvl * B + offs, mask=ok, other=0.0) * \
                tl.exp(s * it - tl.load(lse + lvl * B + offs, mask=ok, other=0.0)) * it
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

def _blocks(D: int) -> tuple[int, int, int]:
    if INTERPRET:
        return 16, 16, min(64, max(16, next_pow2(D)))
    return 64, 64, 64


# Tiles of 64 x 64 with up to 3 live fp32 dot tiles per level group: with 4 warps ptxas (sm_90) spills
# registers in both the forward and the backward kernels; 8 warps compile without (forward) or with a few
# bytes of (backward) spills. Not yet tuned on a GPU.
_NUM_WARPS = 8


def _groups(dims: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(dims[i:i + MAX_LEVELS]) for i in range(0, len(dims), MAX_LEVELS)]


def _pad3(dims: tuple[int, ...]) -> tuple[int, int, int]:
    d = list(dims) + [dims[-1]] * (MAX_LEVELS - len(dims))
    return d[0], d[1], d[2]


def prefix_inv_norms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """fp32 [L, N]: inverse L2 norm of every row's d_l-prefix (x is [N, D], unit stride in D)."""
    N = x.shape[0]
    out = torch.empty(len(dims), N, dtype=torch.float32, device=x.device)
    if N == 0:
        return out
    bm = 16 if INTERPRET else 32
    bd = min(64, max(16, next_pow2(dims[-1])))
    for gi, grp in enumerate(_groups(dims)):
        # Each group restarts at 0 so every level's sum covers its whole prefix.
        sub = torch.empty(len(grp), N, dtype=torch.float32, device=x.device)
        _prefix_inv_norm_kernel[(triton.cdiv(N, bm),)](x, x.stride(0), sub, N, *_pad3(grp),
                                                       NUM_LEVELS=len(grp), BLOCK_M=bm, BLOCK_D=bd)
        out[gi * MAX_LEVELS: gi * MAX_LEVELS + len(grp)] = sub
    return out


def nce_fwd(rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c, diag_offset: int,
            inv_temp: torch.Tensor, dims: tuple[int, ...]):
    """One direction of the loss, forward.

    rows [M, D]; cands [N, D] (positive of row i: cands[i + diag_offset]); shared_neg [S, D] or None
    (extra unmasked candidates of every row); row_neg [M, K, D] or None (own negatives of each row);
    ids_* int64 or None (rows' and candidates' query ids (a) and target ids (b));
    inv_temp fp32 [1]. Returns fp32 [L, M] tensors: lse, pos (cosine of the positive), es
    (p-weighted mean cosine), plus the fp32 norms [L, *] and the per-row negative cosines [L, M, K].
    """
    M, D = rows.shape
    N = cands.shape[0]
    dev = rows.device
    L = len(dims)
    bm, bn, bd = _blocks(D)
    dot = dot_code(rows.dtype)
    inv_rows = prefix_inv_norms(rows, dims)
    inv_cands = prefix_inv_norms(cands, dims)
    inv_shared = prefix_inv_norms(shared_neg, dims) if shared_neg is not None else None
    K = row_neg.shape[1] if row_neg is not None else 0
    inv_rowneg = prefix_inv_norms(row_neg.reshape(M * K, D), dims) if K else None
    row_cos = torch.empty(L, M, K, dtype=torch.float32, device=dev)
    f32 = dict(dtype=torch.float32, device=dev)
    st_m, st_l, st_t = torch.empty(L, M, **f32), torch.empty(L, M, **f32), torch.empty(L, M, **f32)
    pos = torch.zeros(L, M, **f32)
    grid = (triton.cdiv(M, bm),)
    has_a, has_b = ids_a_r is not None, ids_b_r is not None
    dummy = inv_rows
    for gi, grp in enumerate(_groups(dims)):
        sl = slice(gi * MAX_LEVELS, gi * MAX_LEVELS + len(grp))
        d3 = _pad3(grp)
        if K:
            cos_g = torch.empty(len(grp), M, K, **f32)
            _row_negative_cos_kernel[grid](rows, rows.stride(0), row_neg, inv_rows[sl].contiguous(),
                                           inv_rowneg[sl].contiguous(), cos_g, M, K, *d3,
                                           NUM_LEVELS=len(grp), BLOCK_M=bm, BLOCK_D=bd)
            row_cos[sl] = cos_g
        sm, sl_, stt, ps = (torch.empty(len(grp), M, **f32) for _ in range(4))
        _fwd_kernel[grid](rows, cands, rows.stride(0), cands.stride(0), inv_rows[sl].contiguous(),
                          inv_cands[sl].contiguous(), M, N, inv_temp,
                          ids_a_r if has_a else dummy, ids_b_r if has_b else dummy,
                          ids_a_c if has_a else dummy, ids_b_c if has_b else dummy, diag_offset,
                          row_cos[sl].contiguous() if K else dummy, K, sm, sl_, stt, ps, *d3,
                          NUM_LEVELS=len(grp), HAS_IDS_A=has_a, HAS_IDS_B=has_b, HAS_DIAG=True,
                          HAS_ROW_NEG=K > 0, INIT=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT=dot,
                          num_warps=_NUM_WARPS)
        if shared_neg is not None and shared_neg.shape[0] > 0:
            _fwd_kernel[grid](rows, shared_neg, rows.stride(0), shared_neg.stride(0), inv_rows[sl].contiguous(),
                              inv_shared[sl].contiguous(), M, shared_neg.shape[0], inv_temp,
                              dummy, dummy, dummy, dummy, 0, dummy, 0, sm, sl_, stt, ps, *d3,
                              NUM_LEVELS=len(grp), HAS_IDS_A=False, HAS_IDS_B=False, HAS_DIAG=False,
                              HAS_ROW_NEG=False, INIT=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT=dot,
                              num_warps=_NUM_WARPS)
        st_m[sl], st_l[sl], st_t[sl], pos[sl] = sm, sl_, stt, ps
    lse = st_m + torch.log(st_l)
    es = st_t / st_l
    return lse, pos, es, inv_rows, inv_cands, inv_shared, inv_rowneg, row_cos


# fp32 gradient accumulators are allocated per chunk of owner rows: the extra memory of the backward
# stays about this size whatever B (the inputs' gradients themselves are in the inputs' dtype).
GRAD_CHUNK_BYTES = 160 << 20


def _chunks(n: int, row_bytes: int, block: int):
    rows = max(block, (GRAD_CHUNK_BYTES // max(1, row_bytes)) // block * block)
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


def nce_bwd(g: torch.Tensor, rows, cands, shared_neg, row_neg, ids_a_r, ids_b_r, ids_a_c, ids_b_c,
            diag_offset: int, inv_temp: torch.Tensor, dims: tuple[int, ...], lse, inv_rows, inv_cands,
            inv_shared, inv_rowneg, row_cos):
    """Gradients of sum_{l,i} g[l, i] * loss^l_i w.r.t. rows, cands, shared_neg and row_neg
    (g fp32 [L, M]: upstream gradient times level weight). Returns tensors in the inputs' dtypes
    (None for absent inputs). Deterministic: every gradient row is written by one program."""
    M, D = rows.shape
    N = cands.shape[0]
    dev = rows.device
    bm, bn, bd = _blocks(D)
    dot = dot_code(rows.dtype)
    # The gradient MMA multiplies fp32 coefficients P a b, which are tiny at large B (P ~ p / (B tau)):
    # fp16 operands would flush them to zero, so fp16 inputs run that MMA in tf32 (8-bit exponent; the
    # fp16 operand is exact in tf32). bf16 has the exponent range already.
    grad_dot = _DOT_TF32 if dot == DOT_FP16 else dot
    f32 = dict(dtype=torch.float32, device=dev)
    K = row_neg.shape[1] if row_neg is not None else 0
    S = shared_neg.shape[0] if shared_neg is not None else 0
    d_rows = torch.empty_like(rows)
    d_cands = torch.empty_like(cands)
    d_shared = torch.empty_like(shared_neg) if shared_neg is not None else None
    d_rowneg = torch.empty_like(row_neg) if row_neg is not None else None
    has_a, has_b = ids_a_r is not None, ids_b_r is not None
    ids = (ids_a_r if has_a else inv_rows, ids_b_r if has_b else inv_rows,
           ids_a_c if has_a else inv_rows, ids_b_c if has_b else inv_rows)
    no_ids = (inv_rows,) * 4
    groups = [(slice(gi * MAX_LEVELS, gi * MAX_LEVELS + len(grp)), grp) for gi, grp in enumerate(_groups(dims))]
    per_group = [(sl, grp, lse[sl].contiguous(), g[sl].contiguous(), inv_rows[sl].contiguous(),
                  inv_cands[sl].contiguous(), inv_shared[sl].contiguous() if S else None) for sl, grp in groups]

    def launch(own, oth, inv_own, inv_oth, n_oth, start, end, lse_g, g_g, idp, has_ids, diag, gbuf, rbuf,
               grp, owner_is_row, finalize):
        _bwd_kernel[(triton.cdiv(end - start, bm),)](
            own, oth, own.stride(0), oth.stride(0), inv_own, inv_oth, own.shape[0], n_oth, M, start, end,
            lse_g, g_g, inv_temp, *idp, diag_offset, gbuf, rbuf, D, *_pad3(grp),
            OWNER_IS_ROW=owner_is_row, NUM_LEVELS=len(grp), HAS_IDS_A=has_ids and has_a,
            HAS_IDS_B=has_ids and has_b, HAS_DIAG=diag, FINALIZE=finalize, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            DOT=dot, GRAD_DOT=grad_dot, num_warps=_NUM_WARPS)

    # Query rows (with their own negatives): against target tiles, then shared-negative tiles.
    for r0, r1 in _chunks(M, D * 4 * (1 + K), bm):
        gbuf = torch.zeros(r1 - r0, D, **f32)
        dneg = torch.zeros(r1 - r0, K, D, **f32) if K else None
        for sl, grp, lse_g, g_g, ir, ic, isn in per_group:
            rbuf = torch.zeros(len(grp), r1 - r0, **f32)
            if K:
                _row_negative_bwd_kernel[(triton.cdiv(r1 - r0, bm),)](
                    rows, row_neg, rows.stride(0), ir, inv_rowneg[sl].contiguous(), row_cos[sl].contiguous(),
                    lse_g, g_g, inv_temp, gbuf, rbuf, dneg, r0, r1, M, K, D, *_pad3(grp),
                    NUM_LEVELS=len(grp), BLOCK_M=bm, BLOCK_D=bd)
            launch(rows, cands, ir, ic, N, r0, r1, lse_g, g_g, ids, True, True, gbuf, rbuf, grp, True, S == 0)
            if S:
                launch(rows, shared_neg, ir, isn, S, r0, r1, lse_g, g_g, no_ids, False, False, gbuf, rbuf, grp,
                       True, True)
        d_rows[r0:r1] = gbuf
        if K:
            d_rowneg[r0:r1] = dneg
    # Targets against query-row tiles.
    for c0, c1 in _chunks(N, D * 4, bm):
        gbuf = torch.zeros(c1 - c0, D, **f32)
        for sl, grp, lse_g, g_g, ir, ic, isn in per_group:
            launch(cands, rows, ic, ir, M, c0, c1, lse_g, g_g, ids, True, True, gbuf,
                   torch.zeros(len(grp), c1 - c0, **f32), grp, False, True)
        d_cands[c0:c1] = gbuf
    # Shared negatives against query-row tiles (never masked, never positive).
    for c0, c1 in _chunks(S, D * 4, bm):
        gbuf = torch.zeros(c1 - c0, D, **f32)
        for sl, grp, lse_g, g_g, ir, ic, isn in per_group:
            launch(shared_neg, rows, isn, ir, M, c0, c1, lse_g, g_g, no_ids, False, False, gbuf,
                   torch.zeros(len(grp), c1 - c0, **f32), grp, False, True)
        d_shared[c0:c1] = gbuf
    return d_rows, d_cands, d_shared, d_rowneg
