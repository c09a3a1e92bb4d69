"""Varlen (packed) flash attention with fused rotary and GQA: Triton kernels and host launchers.

Layout (flash-attn varlen): q [T, Hq, D], k / v [T, Hkv, D], sequences addressed by cu_seqlens
[B+1]; out [T, Hq, D]; lse [Hq, T] fp32, natural log. Hq % Hkv == 0: query head h reads kv head
h // (Hq / Hkv). Rotary (rotate-half, first R = 2 * HALF dims) is applied to q / k tiles as they
are loaded, from half-width cos / sin tables [T, HALF] read in their own dtype; the backward applies
the transposed rotation to the accumulated dq / dk once, before storing them. No rotated copy of q
or k is ever written to memory.

Rotary design (issue 14): q / k tiles are held as column pieces [0, HALF), [HALF, 2 HALF) and
[2 HALF, D), each loaded contiguously; the rotation is elementwise work between the first two
pieces and a score is the sum of three dots on one accumulator. So there is no second (partner)
load, no gather of the tables over the full head dim, no permutation product for partial rotary:
partial (R < D) and full rotary compile to the same instructions. Rotating q and k once in a
separate pass was rejected: it reads q and k and writes them back (+100% of a forward's DRAM bytes;
+20-50% for k alone at GQA 4 / MHA), where the tables in the kernel add 1.6-5% (static model in
bench/bench_attention.py).

Grid: one program per (tile of one sequence, head), from an exact list of (sequence, tile) pairs
built once per cu_seqlens tensor (tile_schedule; one host read per batch, not per layer), with
the query head (kv head for dk / dv) fastest so a GQA group's programs are neighbours and share
K / V through L2.

Forward: online softmax in fp32 with exp2 (scale * log2(e) applied in one FMA); keys loop over the
program's own sequence only (up to the tile's diagonal when causal): full key blocks without a
score mask, then the masked tail / diagonal blocks; nothing is computed past a sequence's end and
no token ever sees another sequence.

Backward (deterministic by construction, no atomics):
  1. delta[h, t] = rowsum(dO * O) (minus dlse when the LSE itself receives a gradient);
  2. dk / dv: one program per (key tile, kv head) loops over the query heads of its group and the
     query blocks of its sequence and accumulates in registers;
  3. dq: one program per (query tile, query head) loops over the key blocks of its sequence.
Both loops are written for the bidirectional and the causal case. When every sequence fits in one
key tile (max_seqlen <= FUSED_DQ_MAX_SEQLEN), step 3 is folded into step 2: the dk / dv program then
holds all the scores of its sequence and writes each dq element exactly once.
Opt-in (attention_bwd(deterministic=False)): steps 2 and 3 in one kernel, FA2's schedule, 5 matrix
products instead of 7, dq summed over key tiles by fp32 atomics (_attn_bwd_fused_kernel, then a cast
pass); not bit-reproducible, so never the default.

Head dims that are not powers of two (80, 96, ...) run in a tile padded to the next power of two
(masked loads / stores); D is any size up to 256.

Short sequences -- why tiles are sized from max_seqlen rather than packed block-diagonally:
embedding batches are dominated by many short sequences (8192 x ~34 tokens). There attention is
memory-bound: per sequence and head it moves ~4 * L * D elements (q, k, v, out) and does
4 * L^2 * D flops, i.e. ~L / 2 flops per byte in bf16 -- 20 at L = 40, far below the ~300 an
H100 needs to be compute-bound. The figure of merit is therefore bytes moved, not tile occupancy. Per-sequence tiles of
BLOCK >= max_seqlen read every token's q / k / v exactly once (masked lanes of a tile fetch
nothing). Packing several sequences into one query tile of the global token stream with a
block-diagonal mask would re-read the k / v of every sequence that straddles a tile border and
still multiply all the masked-out sub-blocks. So the autotuner sees only configs whose tiles are
not larger than the length bucket (next power of two of max_seqlen) and picks among them; a
batch of 34-token sequences runs with 16..64-row tiles, one program per sequence and head, while
long sequences get the usual 64..128-row tiles.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._common import (LN2, LOG2E, TRITON_VERSION, dot_args, gpu_autotune, interpreter_config, tma_operands,
                      launch_arg)


# ---- device helpers ---------------------------------------------------------------------------
# q / k tiles are held as up to three column pieces: A = [0, HALF), B = [HALF, 2 HALF) (the two rotary
# halves, ROT_W wide each) and C = [2 HALF, D) (the unrotated rest, REST_W wide; the whole head when
# not ROTARY, HALF = 0). Rotate-half then is plain elementwise work on A and B -- no gather of
# partner columns, no permutation product, the same code for partial (R < D) and full rotary -- and
# a score q . k is the sum of the three pieces' dots (one wgmma chain on one accumulator).

@triton.jit
def _load_cols(base, stride_t, offs_t, t_ok, c0, c1, W: tl.constexpr):
    """Tile [rows, W] of x[t, c0 + j] (zero past column c1 and for rows not t_ok)."""
    cols = c0 + tl.arange(0, W)
    return tl.load(base + offs_t[:, None].to(tl.int64) * stride_t + cols[None, :],
                   mask=t_ok[:, None] & (cols < c1)[None, :], other=0.0)


@triton.jit
def _store_cols(base, stride_t, offs_t, t_ok, c0, c1, x, W: tl.constexpr):
    cols = c0 + tl.arange(0, W)
    tl.store(base + offs_t[:, None].to(tl.int64) * stride_t + cols[None, :], x.to(base.dtype.element_ty),
             mask=t_ok[:, None] & (cols < c1)[None, :])


@triton.jit
def _tables(COS, SIN, offs_t, t_ok, HALF, ROT_W: tl.constexpr):
    """cos / sin [rows, ROT_W] in fp32 from half-width tables [T, HALF] read in their own dtype."""
    j = tl.arange(0, ROT_W)
    tab = offs_t[:, None].to(tl.int64) * HALF + j[None, :]
    ok = t_ok[:, None] & (j < HALF)[None, :]
    c = tl.load(COS + tab, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(SIN + tab, mask=ok, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _load_qk(base, stride_t, offs_t, t_ok, D, COS, SIN, HALF, ROTARY: tl.constexpr, ROT_W: tl.constexpr,
             REST_W: tl.constexpr, DOT_DTYPE: tl.constexpr, descs=None, row=0, USE_TMA: tl.constexpr = False):
    """(A, B, C) pieces of a q or k tile in DOT_DTYPE, A / B rotated when ROTARY:
    A' = A cos - B sin, B' = B cos + A sin. Pieces a configuration does not have are 1-column
    placeholders (never used). USE_TMA: the pieces come from the descriptors `descs` (_qk_descs) at
    row `row` of the sequence (offs_t = its first token + row + arange): TMA zero-fills the rows past
    the sequence and the columns past each piece, so no row / column masks."""
    if ROTARY:
        if USE_TMA:
            x1 = descs[0].load([row, 0]).to(tl.float32)
            x2 = descs[1].load([row, 0]).to(tl.float32)
        else:
            x1 = _load_cols(base, stride_t, offs_t, t_ok, 0, HALF, ROT_W).to(tl.float32)
            x2 = _load_cols(base, stride_t, offs_t, t_ok, HALF, 2 * HALF, ROT_W).to(tl.float32)
        c, s = _tables(COS, SIN, offs_t, t_ok, HALF, ROT_W)
        a = (x1 * c - x2 * s).to(DOT_DTYPE)
        b = (x2 * c + x1 * s).to(DOT_DTYPE)
    else:
        a = 0
        b = 0
    if REST_W > 0:
        if USE_TMA:
            r = descs[2].load([row, 0]).to(DOT_DTYPE)
        else:
            r = _load_cols(base, stride_t, offs_t, t_ok, 2 * HALF, D, REST_W).to(DOT_DTYPE)
    else:
        r = 0
    return a, b, r


@triton.jit
def _qk_descs(head_base, start, end, stride_t, D, HALF, BLOCK: tl.constexpr, ROTARY: tl.constexpr,
              ROT_W: tl.constexpr, REST_W: tl.constexpr, USE_TMA: tl.constexpr):
    """The column pieces of _load_qk as device-side TMA descriptors over one head of one sequence (rows
    [start, end), [BLOCK, piece] boxes): A = [0, HALF), B = [HALF, 2 HALF), C = [2 HALF, D). Without
    USE_TMA (or for a piece a configuration does not have) the head's pointer stands in."""
    base = head_base + start.to(tl.int64) * stride_t
    da = head_base
    db = head_base
    dc = head_base
    if USE_TMA:
        if ROTARY:
            da = tl.make_tensor_descriptor(base, shape=[end - start, HALF], strides=[stride_t, 1],
                                           block_shape=[BLOCK, ROT_W])
            db = tl.make_tensor_descriptor(base + HALF, shape=[end - start, HALF], strides=[stride_t, 1],
                                           block_shape=[BLOCK, ROT_W])
        if REST_W > 0:
            dc = tl.make_tensor_descriptor(base + 2 * HALF, shape=[end - start, D - 2 * HALF], strides=[stride_t, 1],
                                           block_shape=[BLOCK, REST_W])
    return da, db, dc


@triton.jit
def _rows_desc(head_base, start, end, stride_t, D, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
               USE_TMA: tl.constexpr):
    """A [BLOCK, HEAD_DIM]-box TMA descriptor over one head of one sequence (v, dO) under USE_TMA, else
    the head's pointer."""
    if USE_TMA:
        return tl.make_tensor_descriptor(head_base + start.to(tl.int64) * stride_t, shape=[end - start, D],
                                         strides=[stride_t, 1], block_shape=[BLOCK, HEAD_DIM])
    else:
        return head_base


@triton.jit
def _load_rows(base, desc, stride_t, offs_t, t_ok, offs_d, D, row, USE_TMA: tl.constexpr):
    """Tile [rows, HEAD_DIM] of a [T, D] head slice (v, dO), zero past D and for rows not t_ok."""
    if USE_TMA:
        x = desc.load([row, 0])
    else:
        x = tl.load(base + offs_t[:, None].to(tl.int64) * stride_t + offs_d[None, :],
                    mask=t_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def _dot_qk(xa, xb, xr, ya, yb, yr, ROTARY: tl.constexpr, REST_W: tl.constexpr, DOT_PREC: tl.constexpr):
    """x . y^T over the head dim from the pieces: fp32 [rows x, rows y]."""
    if ROTARY:
        s = tl.dot(xa, tl.trans(ya), input_precision=DOT_PREC)
        s = tl.dot(xb, tl.trans(yb), s, input_precision=DOT_PREC)
        if REST_W > 0:
            s = tl.dot(xr, tl.trans(yr), s, input_precision=DOT_PREC)
    else:
        s = tl.dot(xr, tl.trans(yr), input_precision=DOT_PREC)
    return s


@triton.jit
def _store_grad(base, stride_t, offs_t, t_ok, D, COS, SIN, HALF, ga, gb, gr, scale,
                ROTARY: tl.constexpr, ROT_W: tl.constexpr, REST_W: tl.constexpr):
    """Store scale * (the gradient w.r.t. the unrotated input) of pieces (ga, gb, gr) taken w.r.t.
    the rotated ones: the transposed rotation x1 = g1 cos + g2 sin, x2 = g2 cos - g1 sin, once per
    tile after the main loop."""
    if ROTARY:
        c, s = _tables(COS, SIN, offs_t, t_ok, HALF, ROT_W)
        _store_cols(base, stride_t, offs_t, t_ok, 0, HALF, (ga * c + gb * s) * scale, ROT_W)
        _store_cols(base, stride_t, offs_t, t_ok, HALF, 2 * HALF, (gb * c - ga * s) * scale, ROT_W)
    if REST_W > 0:
        _store_cols(base, stride_t, offs_t, t_ok, 2 * HALF, D, gr * scale, REST_W)


@triton.jit
def _attn_seq_bounds(cu_seqlens, seq, T):
    """[start, end) of sequence `seq`, clamped into [0, T] with end >= start: with validation off a
    bad cu_seqlens (negative, decreasing, last > T) gives wrong numbers, never an access outside
    the tensors (the loads are scalar, the clamps free)."""
    start = tl.load(cu_seqlens + seq)
    end = tl.load(cu_seqlens + seq + 1)
    start = tl.minimum(tl.maximum(start, 0), T)
    end = tl.minimum(tl.maximum(end, start), T)
    return start, end


@triton.jit
def _attn_tile(SCHED, pid, NH, BLOCK: tl.constexpr):
    """(head, seq, tile) of program `pid` on the exact grid: head fastest, then the (sequence, tile)
    pairs of tile_schedule's list for this BLOCK (SCHED[BLOCK] = where that list starts)."""
    head = pid % NH
    entry = (pid // NH).to(tl.int64)
    off = tl.load(SCHED + BLOCK)
    seq = tl.load(SCHED + off + 2 * entry)
    tile = tl.load(SCHED + off + 2 * entry + 1)
    return head, seq, tile


@triton.jit
def _attn_zero_rows(base, stride_t, lo, hi, first, step, offs_d, D, BLOCK: tl.constexpr,
                    HEAD_DIM: tl.constexpr):
    """Zero rows [lo, hi) of a [T, D] slice, tiles lo + first, lo + first + step, ...: the rows no
    sequence covers (before cu_seqlens[0], after cu_seqlens[-1]; only with validation off) never
    return uninitialised memory. No work when the range is empty (valid input)."""
    zero = tl.zeros([BLOCK, HEAD_DIM], dtype=base.dtype.element_ty)
    for r in range(lo + first, hi, step):
        offs = r + tl.arange(0, BLOCK)
        tl.store(base + offs[:, None].to(tl.int64) * stride_t + offs_d[None, :], zero,
                 mask=(offs < hi)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _attn_zero_vec(base, lo, hi, first, step, BLOCK: tl.constexpr):
    zero = tl.zeros([BLOCK], dtype=base.dtype.element_ty)
    for r in range(lo + first, hi, step):
        offs = r + tl.arange(0, BLOCK)
        tl.store(base + offs, zero, mask=offs < hi)


# ---- forward ----------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_block(acc, m_i, l_i, qa, qb, qr, k_base, v_base, stride_kt, stride_vt, k_lo, hi, offs_m,
                    offs_d, D, COS, SIN, HALF, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr, ROT_W: tl.constexpr,
                    REST_W: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_N: tl.constexpr, k_descs, v_desc, start, USE_TMA: tl.constexpr):
    """One key block of the online softmax. MASKED: the block straddles the sequence end or the
    causal diagonal; the others skip the score mask. USE_TMA: k / v from the sequence's descriptors
    (k_descs, v_desc; rows past the sequence read as zeros, their scores are masked)."""
    offs_n = k_lo + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hi
    ka, kb, kr = _load_qk(k_base, stride_kt, offs_n, n_ok, D, COS, SIN, HALF, ROTARY, ROT_W, REST_W, DOT_DTYPE,
                          k_descs, k_lo - start, USE_TMA)
    v = _load_rows(v_base, v_desc, stride_vt, offs_n, n_ok, offs_d, D, k_lo - start, USE_TMA)
    s = _dot_qk(qa, qb, qr, ka, kb, kr, ROTARY, REST_W, DOT_PREC)
    if MASKED:
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
    # qk_scale = softmax_scale * log2(e), applied once in the exp2's argument (one FMA per score).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, cu_seqlens, COS, SIN, SCHED,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     T, D, HALF, qk_scale, LEN_BUCKET, N_SEQ, HQ,
                     GROUP: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr,
                     ROT_W: tl.constexpr, REST_W: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     USE_TMA: tl.constexpr):
    """One program per (query tile of one sequence, query head) of the exact grid (tile_schedule),
    query head fastest: the GROUP heads sharing one kv head run as neighbouring programs, so a
    tile's K / V come from DRAM once per group and from L2 for the rest of the group.
    USE_TMA: q, k, v loaded through device-side descriptors of the sequence (_qk_descs, _rows_desc)."""
    head, seq, tile = _attn_tile(SCHED, tl.program_id(0), HQ, BLOCK_M)
    start, end = _attn_seq_bounds(cu_seqlens, seq, T)
    kv_head = head // GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    o_base = O + head.to(tl.int64) * stride_oh
    lse_base = LSE + head.to(tl.int64) * T
    step = tl.maximum(tl.cdiv(end - start, BLOCK_M), 1) * BLOCK_M  # the sequence's tiles in the schedule
    if seq == 0:
        _attn_zero_rows(o_base, stride_ot, 0, start, tile * BLOCK_M, step, offs_d, D, BLOCK_M, HEAD_DIM)
        _attn_zero_vec(lse_base, 0, start, tile * BLOCK_M, step, BLOCK_M)
    if seq == N_SEQ - 1:
        _attn_zero_rows(o_base, stride_ot, end, T, tile * BLOCK_M, step, offs_d, D, BLOCK_M, HEAD_DIM)
        _attn_zero_vec(lse_base, end, T, tile * BLOCK_M, step, BLOCK_M)
    k_base = K + kv_head.to(tl.int64) * stride_kh
    v_base = V + kv_head.to(tl.int64) * stride_vh
    q_lo = start + tile * BLOCK_M
    if q_lo < end:  # false only for the placeholder tile of an empty first / last sequence
        offs_m = q_lo + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        q_head = Q + head.to(tl.int64) * stride_qh
        q_descs = _qk_descs(q_head, start, end, stride_qt, D, HALF, BLOCK_M, ROTARY, ROT_W, REST_W, USE_TMA)
        k_descs = _qk_descs(k_base, start, end, stride_kt, D, HALF, BLOCK_N, ROTARY, ROT_W, REST_W, USE_TMA)
        v_desc = _rows_desc(v_base, start, end, stride_vt, D, BLOCK_N, HEAD_DIM, USE_TMA)
        qa, qb, qr = _load_qk(q_head, stride_qt, offs_m, m_ok, D, COS, SIN, HALF,
                              ROTARY, ROT_W, REST_W, DOT_DTYPE, q_descs, q_lo - start, USE_TMA)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        hi = end
        n_full = (end - start) // BLOCK_N
        if CAUSAL:
            hi = tl.minimum(end, q_lo + BLOCK_M)
            n_full = tl.minimum(n_full, (q_lo + 1 - start) // BLOCK_N)  # blocks wholly before the tile's first row
        full_hi = start + n_full * BLOCK_N
        for k_lo in range(start, full_hi, BLOCK_N):
            acc, m_i, l_i = _attn_fwd_block(acc, m_i, l_i, qa, qb, qr, k_base, v_base, stride_kt, stride_vt, k_lo,
                                            hi, offs_m, offs_d, D, COS, SIN, HALF, qk_scale, False, CAUSAL, ROTARY,
                                            ROT_W, REST_W, DOT_DTYPE, DOT_PREC, BLOCK_N,
                                            k_descs, v_desc, start, USE_TMA)
        # The sequence-end / diagonal blocks. Every row sees its sequence's first key in the first
        # block it processes, so m_i is finite from then on.
        for k_lo in range(full_hi, hi, BLOCK_N):
            acc, m_i, l_i = _attn_fwd_block(acc, m_i, l_i, qa, qb, qr, k_base, v_base, stride_kt, stride_vt, k_lo,
                                            hi, offs_m, offs_d, D, COS, SIN, HALF, qk_scale, True, CAUSAL, ROTARY,
                                            ROT_W, REST_W, DOT_DTYPE, DOT_PREC, BLOCK_N,
                                            k_descs, v_desc, start, USE_TMA)
        out = acc / l_i[:, None]
        tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_d < D)[None, :])
        tl.store(lse_base + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=m_ok)


# ---- backward ---------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DLSE, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, T, D,
                           HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, t] = sum_d dO * O - dlse[h, t]: the row term of dS = P * (dP - delta)."""
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    rows = offs_t[:, None].to(tl.int64)
    o = tl.load(O + head * stride_oh + rows * stride_ot + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + head * stride_doh + rows * stride_dot + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + head * T + offs_t, mask=offs_t < T, other=0.0)
    tl.store(DELTA + head * T + offs_t, delta, mask=offs_t < T)


@triton.jit
def _attn_multi_key(offs_m, start, end, CAUSAL: tl.constexpr, HAS_DLSE: tl.constexpr):
    """Rows with more than one key. A query row with a single key (a 1-token sequence; the first
    token when causal) has softmax == 1 whatever its score: its dS is exactly 0 (dP - delta would
    leave ~1e-6) unless the lse itself has a gradient (then dS = dlse, kept in delta)."""
    if HAS_DLSE:
        multi = offs_m >= 0
    elif CAUSAL:
        multi = offs_m > start
    else:
        multi = (offs_m >= 0) & (end - start > 1)
    return multi


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, cu_seqlens, COS, SIN, SCHED,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                          stride_dqt, stride_dqh,
                          T, D, HALF, qk_scale, sm_scale, LEN_BUCKET, N_SEQ, HKV,
                          GROUP: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr,
                          ROT_W: tl.constexpr, REST_W: tl.constexpr,
                          HAS_DLSE: tl.constexpr, FUSED_DQ: tl.constexpr, DOT_DTYPE: tl.constexpr,
                          DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """One program per (key tile, kv head) of the exact grid, kv head fastest: dk, dv accumulated
    over the group's heads x query blocks. USE_TMA: q, k, v, dO through descriptors of the sequence
    (q / dO: one pair per head of the group).

    FUSED_DQ (every sequence fits in one query block and one key tile): the program sees all of its
    sequence's scores, so it also writes the complete dq of each head of its group -- each element
    once, no atomics -- and the separate dq kernel is skipped (q, k, v, dO read once in all)."""
    kv_head, seq, tile = _attn_tile(SCHED, tl.program_id(0), HKV, BLOCK_N)
    start, end = _attn_seq_bounds(cu_seqlens, seq, T)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    dk_base = DK + kv_head.to(tl.int64) * stride_dkh
    dv_base = DV + kv_head.to(tl.int64) * stride_dvh
    step = tl.maximum(tl.cdiv(end - start, BLOCK_N), 1) * BLOCK_N
    if seq == 0:
        _attn_zero_rows(dk_base, stride_dkt, 0, start, tile * BLOCK_N, step, offs_d, D, BLOCK_N, HEAD_DIM)
        _attn_zero_rows(dv_base, stride_dvt, 0, start, tile * BLOCK_N, step, offs_d, D, BLOCK_N, HEAD_DIM)
        if FUSED_DQ:
            for g in range(GROUP):
                _attn_zero_rows(DQ + (kv_head * GROUP + g).to(tl.int64) * stride_dqh, stride_dqt, 0, start,
                                tile * BLOCK_N, step, offs_d, D, BLOCK_N, HEAD_DIM)
    if seq == N_SEQ - 1:
        _attn_zero_rows(dk_base, stride_dkt, end, T, tile * BLOCK_N, step, offs_d, D, BLOCK_N, HEAD_DIM)
        _attn_zero_rows(dv_base, stride_dvt, end, T, tile * BLOCK_N, step, offs_d, D, BLOCK_N, HEAD_DIM)
        if FUSED_DQ:
            for g in range(GROUP):
                _attn_zero_rows(DQ + (kv_head * GROUP + g).to(tl.int64) * stride_dqh, stride_dqt, end, T,
                                tile * BLOCK_N, step, offs_d, D, BLOCK_N, HEAD_DIM)
    k_lo = start + tile * BLOCK_N
    if k_lo < end:  # false only for the placeholder tile of an empty first / last sequence
        offs_n = k_lo + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k_head = K + kv_head.to(tl.int64) * stride_kh
        k_descs = _qk_descs(k_head, start, end, stride_kt, D, HALF, BLOCK_N, ROTARY, ROT_W, REST_W, USE_TMA)
        ka, kb, kr = _load_qk(k_head, stride_kt, offs_n, n_ok, D, COS, SIN, HALF, ROTARY, ROT_W, REST_W, DOT_DTYPE,
                              k_descs, k_lo - start, USE_TMA)
        v_head = V + kv_head.to(tl.int64) * stride_vh
        v_desc = _rows_desc(v_head, start, end, stride_vt, D, BLOCK_N, HEAD_DIM, USE_TMA)
        if USE_TMA:
            v = v_desc.load([k_lo - start, 0]).to(DOT_DTYPE)
        else:  # (not _load_rows: the pointer path's codegen as before the TMA path)
            v = (tl.load(v_head + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)).to(DOT_DTYPE)
        # dk in the pieces of k (taken w.r.t. the rotated k; rotated back once at the end).
        if ROTARY:
            dka = tl.zeros([BLOCK_N, ROT_W], dtype=tl.float32)
            dkb = tl.zeros([BLOCK_N, ROT_W], dtype=tl.float32)
        if REST_W > 0:
            dkr = tl.zeros([BLOCK_N, REST_W], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        lo = start
        if CAUSAL:  # query blocks (aligned to the sequence start) wholly before this key tile see none of it
            lo = start + ((k_lo - start) // BLOCK_M) * BLOCK_M
        for g in range(GROUP):
            head = (kv_head * GROUP + g).to(tl.int64)
            q_head = Q + head * stride_qh
            do_head = DO + head * stride_doh
            q_descs = _qk_descs(q_head, start, end, stride_qt, D, HALF, BLOCK_M, ROTARY, ROT_W, REST_W, USE_TMA)
            do_desc = _rows_desc(do_head, start, end, stride_dot, D, BLOCK_M, HEAD_DIM, USE_TMA)
            for q_lo in range(lo, end, BLOCK_M):
                offs_m = q_lo + tl.arange(0, BLOCK_M)
                m_ok = offs_m < end
                multi = _attn_multi_key(offs_m, start, end, CAUSAL, HAS_DLSE)
                # (the pointers re-derived here, as before the TMA path: the pointer path's codegen is unchanged)
                qa, qb, qr = _load_qk(Q + head * stride_qh, stride_qt, offs_m, m_ok, D, COS, SIN, HALF,
                                      ROTARY, ROT_W, REST_W, DOT_DTYPE, q_descs, q_lo - start, USE_TMA)
                do = _load_rows(DO + head * stride_doh, do_desc, stride_dot, offs_m, m_ok, offs_d, D, q_lo - start,
                                USE_TMA)
                do = do.to(DOT_DTYPE)
                lse2 = tl.load(LSE + head * T + offs_m, mask=m_ok, other=0.0) * LOG2E
                delta = tl.load(DELTA + head * T + offs_m, mask=m_ok, other=0.0)
                # Transposed scores [BLOCK_N, BLOCK_M], so dk / dv accumulate without transposing P.
                s_t = _dot_qk(ka, kb, kr, qa, qb, qr, ROTARY, REST_W, DOT_PREC)
                valid = n_ok[:, None] & m_ok[None, :]
                if CAUSAL:
                    valid = valid & (offs_m[None, :] >= offs_n[:, None])
                p_t = tl.where(valid, tl.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
                dv += tl.dot(p_t.to(DOT_DTYPE), do, input_precision=DOT_PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                ds_t = tl.where(multi[None, :], p_t * (dp_t - delta[None, :]), 0.0).to(DOT_DTYPE)
                if ROTARY:
                    dka = tl.dot(ds_t, qa, dka, input_precision=DOT_PREC)
                    dkb = tl.dot(ds_t, qb, dkb, input_precision=DOT_PREC)
                if REST_W > 0:
                    dkr = tl.dot(ds_t, qr, dkr, input_precision=DOT_PREC)
                if FUSED_DQ:
                    ds = tl.trans(ds_t)
                    if ROTARY:
                        dqa = tl.dot(ds, ka, input_precision=DOT_PREC)
                        dqb = tl.dot(ds, kb, input_precision=DOT_PREC)
                    else:
                        dqa = 0
                        dqb = 0
                    if REST_W > 0:
                        dqr = tl.dot(ds, kr, input_precision=DOT_PREC)
                    else:
                        dqr = 0
                    _store_grad(DQ + head * stride_dqh, stride_dqt, offs_m, m_ok, D, COS, SIN, HALF, dqa, dqb, dqr,
                                sm_scale, ROTARY, ROT_W, REST_W)
        if not ROTARY:
            dka = 0
            dkb = 0
        if REST_W == 0:
            dkr = 0
        _store_grad(dk_base, stride_dkt, offs_n, n_ok, D, COS, SIN, HALF, dka, dkb, dkr, sm_scale,
                    ROTARY, ROT_W, REST_W)
        tl.store(dv_base + offs_n[:, None].to(tl.int64) * stride_dvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_dq_block(dqa, dqb, dqr, qa, qb, qr, do, lse2, delta, multi, k_base, v_base, stride_kt, stride_vt,
                   k_lo, hi, offs_m, offs_d, D, COS, SIN, HALF, qk_scale,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr, ROT_W: tl.constexpr,
                   REST_W: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, k_descs, v_desc, start, USE_TMA: tl.constexpr):
    """One key block of dq = sum_k dS k (see _attn_fwd_block for MASKED and USE_TMA)."""
    offs_n = k_lo + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hi
    ka, kb, kr = _load_qk(k_base, stride_kt, offs_n, n_ok, D, COS, SIN, HALF, ROTARY, ROT_W, REST_W, DOT_DTYPE,
                          k_descs, k_lo - start, USE_TMA)
    v = _load_rows(v_base, v_desc, stride_vt, offs_n, n_ok, offs_d, D, k_lo - start, USE_TMA).to(DOT_DTYPE)
    s = _dot_qk(qa, qb, qr, ka, kb, kr, ROTARY, REST_W, DOT_PREC)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = tl.where(multi[:, None], p * (dp - delta[:, None]), 0.0).to(DOT_DTYPE)
    if ROTARY:
        dqa = tl.dot(ds, ka, dqa, input_precision=DOT_PREC)
        dqb = tl.dot(ds, kb, dqb, input_precision=DOT_PREC)
    if REST_W > 0:
        dqr = tl.dot(ds, kr, dqr, input_precision=DOT_PREC)
    return dqa, dqb, dqr


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens, COS, SIN, SCHED,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_dqt, stride_dqh,
                        T, D, HALF, qk_scale, sm_scale, LEN_BUCKET, N_SEQ, HQ,
                        GROUP: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr,
                        ROT_W: tl.constexpr, REST_W: tl.constexpr,
                        HAS_DLSE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        USE_TMA: tl.constexpr):
    """One program per (query tile, query head) of the exact grid, query head fastest (see
    _attn_fwd_kernel): dq accumulated over the key blocks of its sequence. USE_TMA: q, k, v, dO
    through descriptors of the sequence."""
    head, seq, tile = _attn_tile(SCHED, tl.program_id(0), HQ, BLOCK_M)
    head = head.to(tl.int64)
    start, end = _attn_seq_bounds(cu_seqlens, seq, T)
    kv_head = head // GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    dq_base = DQ + head * stride_dqh
    step = tl.maximum(tl.cdiv(end - start, BLOCK_M), 1) * BLOCK_M
    if seq == 0:
        _attn_zero_rows(dq_base, stride_dqt, 0, start, tile * BLOCK_M, step, offs_d, D, BLOCK_M, HEAD_DIM)
    if seq == N_SEQ - 1:
        _attn_zero_rows(dq_base, stride_dqt, end, T, tile * BLOCK_M, step, offs_d, D, BLOCK_M, HEAD_DIM)
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh
    q_lo = start + tile * BLOCK_M
    if q_lo < end:
        offs_m = q_lo + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        multi = _attn_multi_key(offs_m, start, end, CAUSAL, HAS_DLSE)
        q_head = Q + head * stride_qh
        do_head = DO + head * stride_doh
        q_descs = _qk_descs(q_head, start, end, stride_qt, D, HALF, BLOCK_M, ROTARY, ROT_W, REST_W, USE_TMA)
        do_desc = _rows_desc(do_head, start, end, stride_dot, D, BLOCK_M, HEAD_DIM, USE_TMA)
        k_descs = _qk_descs(k_base, start, end, stride_kt, D, HALF, BLOCK_N, ROTARY, ROT_W, REST_W, USE_TMA)
        v_desc = _rows_desc(v_base, start, end, stride_vt, D, BLOCK_N, HEAD_DIM, USE_TMA)
        qa, qb, qr = _load_qk(Q + head * stride_qh, stride_qt, offs_m, m_ok, D, COS, SIN, HALF,
                              ROTARY, ROT_W, REST_W, DOT_DTYPE, q_descs, q_lo - start, USE_TMA)
        if USE_TMA:
            do = do_desc.load([q_lo - start, 0]).to(DOT_DTYPE)
        else:  # (not _load_rows: the pointer path's codegen as before the TMA path)
            do = (tl.load(DO + head * stride_doh + offs_m[:, None].to(tl.int64) * stride_dot + offs_d[None, :],
                          mask=m_ok[:, None] & d_ok[None, :], other=0.0)).to(DOT_DTYPE)
        lse2 = tl.load(LSE + head * T + offs_m, mask=m_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + head * T + offs_m, mask=m_ok, other=0.0)
        if ROTARY:
            dqa = tl.zeros([BLOCK_M, ROT_W], dtype=tl.float32)
            dqb = tl.zeros([BLOCK_M, ROT_W], dtype=tl.float32)
        else:
            dqa = 0
            dqb = 0
        if REST_W > 0:
            dqr = tl.zeros([BLOCK_M, REST_W], dtype=tl.float32)
        else:
            dqr = 0
        hi = end
        n_full = (end - start) // BLOCK_N
        if CAUSAL:
            hi = tl.minimum(end, q_lo + BLOCK_M)
            n_full = tl.minimum(n_full, (q_lo + 1 - start) // BLOCK_N)
        full_hi = start + n_full * BLOCK_N
        for k_lo in range(start, full_hi, BLOCK_N):
            dqa, dqb, dqr = _attn_dq_block(dqa, dqb, dqr, qa, qb, qr, do, lse2, delta, multi, k_base, v_base,
                                           stride_kt, stride_vt, k_lo, hi, offs_m, offs_d, D, COS, SIN, HALF,
                                           qk_scale, False, CAUSAL, ROTARY, ROT_W, REST_W, DOT_DTYPE, DOT_PREC,
                                           BLOCK_N, k_descs, v_desc, start, USE_TMA)
        for k_lo in range(full_hi, hi, BLOCK_N):
            dqa, dqb, dqr = _attn_dq_block(dqa, dqb, dqr, qa, qb, qr, do, lse2, delta, multi, k_base, v_base,
                                           stride_kt, stride_vt, k_lo, hi, offs_m, offs_d, D, COS, SIN, HALF,
                                           qk_scale, True, CAUSAL, ROTARY, ROT_W, REST_W, DOT_DTYPE, DOT_PREC,
                                           BLOCK_N, k_descs, v_desc, start, USE_TMA)
        _store_grad(dq_base, stride_dqt, offs_m, m_ok, D, COS, SIN, HALF, dqa, dqb, dqr, sm_scale,
                    ROTARY, ROT_W, REST_W)


# ---- backward in one kernel, dq by atomics (deterministic=False) -----------------------------------
# FA2's schedule: the key-tile owner computes S and P once per (query block, key tile) and does all
# five products there -- S = Q K^T, dV += P^T dO, dP = dO V^T, dK += dS^T Q, dQ += dS K -- instead of
# the seven of the deterministic pair of kernels (S and dP recomputed by the dq kernel). dq is then
# summed over key tiles by fp32 atomics into a [T, Hq, D] buffer, whose addition order is not fixed:
# the result is not bit-reproducible run to run, hence opt-in only. dq is accumulated in the rotated
# frame (the column pieces of q as loaded) and unscaled; the cast pass applies sm_scale and the
# transposed rotation once per element (both linear, so summing first is exact).

@triton.jit
def _attn_atomic_add_cols(base, stride_t, offs_t, t_ok, c0, c1, x, W: tl.constexpr):
    """x[rows, W] added into columns [c0, c1) of an fp32 [T, D] slice (relaxed: only the sum after
    the kernel matters)."""
    cols = c0 + tl.arange(0, W)
    tl.atomic_add(base + offs_t[:, None].to(tl.int64) * stride_t + cols[None, :], x,
                  mask=t_ok[:, None] & (cols < c1)[None, :], sem="relaxed")


@triton.jit
def _attn_bwd_fused_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, cu_seqlens, COS, SIN, SCHED,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                           stride_acc_t, stride_acc_h,
                           T, D, HALF, qk_scale, sm_scale, LEN_BUCKET, N_SEQ, HKV,
                           GROUP: tl.constexpr, CAUSAL: tl.constexpr, ROTARY: tl.constexpr,
                           ROT_W: tl.constexpr, REST_W: tl.constexpr,
                           HAS_DLSE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           USE_TMA: tl.constexpr):
    """One program per (key tile, kv head) of the exact grid, kv head fastest (as
    _attn_bwd_dkdv_kernel): dk, dv in registers over the group's heads x query blocks, and each
    block's dS K added into DQ_ACC (fp32, zeroed by the host; rows no sequence covers stay 0).
    USE_TMA: the owned k / v tile and the streamed q / dO blocks through descriptors of the sequence
    (_qk_descs, _rows_desc; q / dO one set per head of the group; rows past the sequence read as zeros,
    their scores masked as on pointers). lse / delta rows ([Hq, T] fp32: a sequence's rows start at any
    token, so no 16-byte-aligned descriptor base) and the dq atomics stay on pointers."""
    kv_head, seq, tile = _attn_tile(SCHED, tl.program_id(0), HKV, BLOCK_N)
    start, end = _attn_seq_bounds(cu_seqlens, seq, T)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    dk_base = DK + kv_head.to(tl.int64) * stride_dkh
    dv_base = DV + kv_head.to(tl.int64) * stride_dvh
    step = tl.maximum(tl.cdiv(end - start, BLOCK_N), 1) * BLOCK_N
    if seq == 0:
        _attn_zero_rows(dk_base, stride_dkt, 0, start, tile * BLOCK_N, step, offs_d, D, BLOCK_N, HEAD_DIM)
        _attn_zero_rows(dv_base, stride_dvt, 0, start, tile * BLOCK_N, step, offs_d, D, BLOCK_N, HEAD_DIM)
    if seq == N_SEQ - 1:
        _attn_zero_rows(dk_base, stride_dkt, end, T, tile * BLOCK_N, step, offs_d, D, BLOCK_N, HEAD_DIM)
        _attn_zero_rows(dv_base, stride_dvt, end, T, tile * BLOCK_N, step, offs_d, D, BLOCK_N, HEAD_DIM)
    k_lo = start + tile * BLOCK_N
    if k_lo < end:  # false only for the placeholder tile of an empty first / last sequence
        offs_n = k_lo + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k_descs = _qk_descs(K + kv_head.to(tl.int64) * stride_kh, start, end, stride_kt, D, HALF, BLOCK_N, ROTARY,
                            ROT_W, REST_W, USE_TMA)
        ka, kb, kr = _load_qk(K + kv_head.to(tl.int64) * stride_kh, stride_kt, offs_n, n_ok, D, COS, SIN, HALF,
                              ROTARY, ROT_W, REST_W, DOT_DTYPE, k_descs, k_lo - start, USE_TMA)
        if USE_TMA:
            v_desc = _rows_desc(V + kv_head.to(tl.int64) * stride_vh, start, end, stride_vt, D, BLOCK_N, HEAD_DIM,
                                USE_TMA)
            v = v_desc.load([k_lo - start, 0]).to(DOT_DTYPE)
        else:  # (the pointer path's code as before the TMA path)
            v = (tl.load(V + kv_head.to(tl.int64) * stride_vh + offs_n[:, None].to(tl.int64) * stride_vt
                         + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)).to(DOT_DTYPE)
        if ROTARY:
            dka = tl.zeros([BLOCK_N, ROT_W], dtype=tl.float32)
            dkb = tl.zeros([BLOCK_N, ROT_W], dtype=tl.float32)
        else:
            dka = 0
            dkb = 0
        if REST_W > 0:
            dkr = tl.zeros([BLOCK_N, REST_W], dtype=tl.float32)
        else:
            dkr = 0
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        lo = start
        if CAUSAL:  # query blocks (aligned to the sequence start) wholly before this key tile see none of it
            lo = start + ((k_lo - start) // BLOCK_M) * BLOCK_M
        for g in range(GROUP):
            head = (kv_head * GROUP + g).to(tl.int64)
            acc_base = DQ_ACC + head * stride_acc_h
            q_descs = _qk_descs(Q + head * stride_qh, start, end, stride_qt, D, HALF, BLOCK_M, ROTARY, ROT_W, REST_W,
                                USE_TMA)
            do_desc = _rows_desc(DO + head * stride_doh, start, end, stride_dot, D, BLOCK_M, HEAD_DIM, USE_TMA)
            for q_lo in range(lo, end, BLOCK_M):
                offs_m = q_lo + tl.arange(0, BLOCK_M)
                m_ok = offs_m < end
                multi = _attn_multi_key(offs_m, start, end, CAUSAL, HAS_DLSE)
                qa, qb, qr = _load_qk(Q + head * stride_qh, stride_qt, offs_m, m_ok, D, COS, SIN, HALF,
                                      ROTARY, ROT_W, REST_W, DOT_DTYPE, q_descs, q_lo - start, USE_TMA)
                if USE_TMA:
                    do = do_desc.load([q_lo - start, 0]).to(DOT_DTYPE)
                else:  # (the pointer path's code as before the TMA path)
                    do = (tl.load(DO + head * stride_doh + offs_m[:, None].to(tl.int64) * stride_dot
                                  + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)).to(DOT_DTYPE)
                lse2 = tl.load(LSE + head * T + offs_m, mask=m_ok, other=0.0) * LOG2E
                delta = tl.load(DELTA + head * T + offs_m, mask=m_ok, other=0.0)
                # Transposed scores [BLOCK_N, BLOCK_M] (as the dk / dv kernel): dk / dv need no transpose of P.
                s_t = _dot_qk(ka, kb, kr, qa, qb, qr, ROTARY, REST_W, DOT_PREC)
                valid = n_ok[:, None] & m_ok[None, :]
                if CAUSAL:
                    valid = valid & (offs_m[None, :] >= offs_n[:, None])
                p_t = tl.where(valid, tl.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
                dv += tl.dot(p_t.to(DOT_DTYPE), do, input_precision=DOT_PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                ds_t = tl.where(multi[None, :], p_t * (dp_t - delta[None, :]), 0.0).to(DOT_DTYPE)
                ds = tl.trans(ds_t)
                if ROTARY:
                    dka = tl.dot(ds_t, qa, dka, input_precision=DOT_PREC)
                    dkb = tl.dot(ds_t, qb, dkb, input_precision=DOT_PREC)
                    _attn_atomic_add_cols(acc_base, stride_acc_t, offs_m, m_ok, 0, HALF,
                                          tl.dot(ds, ka, input_precision=DOT_PREC), ROT_W)
                    _attn_atomic_add_cols(acc_base, stride_acc_t, offs_m, m_ok, HALF, 2 * HALF,
                                          tl.dot(ds, kb, input_precision=DOT_PREC), ROT_W)
                if REST_W > 0:
                    dkr = tl.dot(ds_t, qr, dkr, input_precision=DOT_PREC)
                    _attn_atomic_add_cols(acc_base, stride_acc_t, offs_m, m_ok, 2 * HALF, D,
                                          tl.dot(ds, kr, input_precision=DOT_PREC), REST_W)
        _store_grad(dk_base, stride_dkt, offs_n, n_ok, D, COS, SIN, HALF, dka, dkb, dkr, sm_scale,
                    ROTARY, ROT_W, REST_W)
        tl.store(dv_base + offs_n[:, None].to(tl.int64) * stride_dvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_dq_cast_kernel(DQ_ACC, DQ, COS, SIN, stride_acc_t, stride_acc_h, stride_dqt, stride_dqh,
                             T, D, HALF, sm_scale, ROTARY: tl.constexpr, ROT_W: tl.constexpr,
                             REST_W: tl.constexpr, BLOCK: tl.constexpr):
    """dq = sm_scale * R^T (the fp32 rotated-frame sum) in dq's dtype, for every row (the rows no
    sequence covers are 0 in the buffer)."""
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t_ok = offs_t < T
    head = tl.program_id(1).to(tl.int64)
    acc = DQ_ACC + head * stride_acc_h
    if ROTARY:
        ga = _load_cols(acc, stride_acc_t, offs_t, t_ok, 0, HALF, ROT_W)
        gb = _load_cols(acc, stride_acc_t, offs_t, t_ok, HALF, 2 * HALF, ROT_W)
    else:
        ga = 0
        gb = 0
    if REST_W > 0:
        gr = _load_cols(acc, stride_acc_t, offs_t, t_ok, 2 * HALF, D, REST_W)
    else:
        gr = 0
    _store_grad(DQ + head * stride_dqh, stride_dqt, offs_t, t_ok, D, COS, SIN, HALF, ga, gb, gr, sm_scale,
                ROTARY, ROT_W, REST_W)


# ---- configs ----------------------------------------------------------------------------------

# Under the interpreter autotuning is pointless (and slow): one small fixed config.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Hopper tiles (sm_90a: 64K registers and 227 KiB of shared memory per CTA), chosen from the static
# sm_90a report: every config below compiles to wgmma where its dots have M >= 64 and, where it
# is not listed in SM90_KNOWN_SPILLS, has no spill inside its main loop at head dims 64 / 128.
# Tiles of 64+ rows run with a multiple of 4 warps (wgmma is issued per warpgroup of 4).
# 128x64 w8 with three stages (fwd and dq): compiles without an in-loop spill on both load paths under Triton
# 3.9 and 3.6 at head dims 64 / 128 (except dq + rotary at D128 on TMA under 3.6: SM90_KNOWN_SPILLS_TMA).
_FWD_CONFIGS = [_cfg(128, 128, 8, 2), _cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2),
                _cfg(32, 32, 2, 2), _cfg(16, 16, 2, 2)]
# dk / dv: the dots have M = BLOCK_N (the resident key tile), so BLOCK_N >= 64 on long sequences;
# square tiles of each length bucket for the fused-dq path of short sequences.
# 32x64 w8 with one stage: the fused-dq tile that does not spill at GQA 4 + rotary under Triton 3.6
# (the fused path has one query block per head, so a second stage buys nothing there).
_DKDV_CONFIGS = [_cfg(32, 128, 8, 2), _cfg(32, 64, 8, 2), _cfg(64, 64, 8, 2), _cfg(32, 64, 8, 1),
                 _cfg(32, 32, 4, 2), _cfg(16, 16, 2, 2)]
# dq: M = BLOCK_M (the resident query tile).
_DQ_CONFIGS = [_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 2), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2),
               _cfg(32, 32, 4, 2), _cfg(16, 16, 2, 2)]


def length_bucket(max_seqlen: int) -> int:
    """Autotune key for sequence length: next power of two of max_seqlen, clamped to [16, 4096]."""
    return min(4096, max(16, triton.next_power_of_2(max_seqlen)))


# Backward of short sequences (max_seqlen <= this): one kernel for dq, dk and dv (see _attn_bwd_dkdv_kernel).
FUSED_DQ_MAX_SEQLEN = 64


def fuse_dq(max_seqlen: int) -> bool:
    """Whether the backward computes dq inside the dk / dv kernel: every sequence must fit in one
    key tile; on GPU the autotuner then only tries key tiles of exactly the length bucket."""
    if INTERPRET:
        return max_seqlen <= min(INTERPRET_CONFIG["BLOCK_M"], INTERPRET_CONFIG["BLOCK_N"])
    return max_seqlen <= FUSED_DQ_MAX_SEQLEN


SM90_SMEM_LIMIT = 227 * 1024


def smem_estimate(kind: str, bm: int, bn: int, stages: int, head_dim: int, elem: int = 2) -> int:
    """Shared-memory bytes of one config (the compiler's operand buffers, within ~10% of what
    bench/static_report reads from the cubins): fwd keeps q plus `stages` K / V tiles and P; the
    backward kernels keep their resident tiles plus `stages` copies of the streamed ones and dS."""
    if kind == "fwd":
        return elem * (bm * head_dim + stages * 2 * bn * head_dim + bm * bn)
    if kind in ("dkdv", "dkdv_dq"):  # resident k, v; streamed q, dO (+ the fused dq's dS^T)
        return elem * (2 * bn * head_dim + stages * 2 * bm * head_dim + 2 * bm * bn)
    return elem * (2 * bm * head_dim + stages * 2 * bn * head_dim + 2 * bm * bn)  # dq: resident q, dO


# Configs that spill inside their main loop on sm_90a (bench/results/static-sm90a and, for the GPU
# image's Triton, static-sm90a-triton3.6): dropped on a GPU. Rows: (kernel kind, head dim tile,
# rotary, smallest GROUP it spills at (1: any; the query-head loop only exists for GROUP > 1),
# Triton major.minor versions it spills under (None: every version seen),
# {(BLOCK_M, BLOCK_N, num_warps, num_stages)}).
SM90_KNOWN_SPILLS: list[tuple[str, int, bool, int, frozenset | None, frozenset]] = [
    ("fwd", 128, True, 1, None, frozenset({(128, 128, 8, 2)})),
    ("dkdv", 128, True, 1, None, frozenset({(32, 128, 8, 2), (64, 64, 8, 2)})),
    ("dkdv", 128, False, 2, None, frozenset({(64, 64, 8, 2)})),       # GROUP 1 does not spill
    ("dkdv_dq", 128, False, 1, None, frozenset({(64, 64, 8, 2)})),
    ("dkdv_dq", 128, True, 1, None, frozenset({(64, 64, 8, 2)})),
    # Triton 3.6 only: 1-3 words reloaded per query block at GQA 4 with rotary (3.9 allocates them).
    ("dkdv_dq", 128, True, 2, frozenset({"3.6"}), frozenset({(32, 64, 8, 2)})),
    ("dkdv_dq", 64, True, 2, frozenset({"3.6"}), frozenset({(32, 64, 8, 2), (64, 64, 8, 2)})),
]

# The same for the TMA path (USE_TMA: no pointer tiles or masks, other register figures), from the sm_90a
# compile under Triton 3.9 and 3.6 of every config at head dims 64 / 128, GROUP 1 / 4, rotary off / full,
# max_seqlen 64 / 512, and the full static report (partial rotary too).
SM90_KNOWN_SPILLS_TMA: list[tuple[str, int, bool, int, frozenset | None, frozenset]] = [
    ("fwd", 128, True, 1, None, frozenset({(128, 128, 8, 2)})),  # partial rotary (full rotary does not spill)
    # dk / dv with rotary at D >= 128 launch on pointers (attention_bwd); the rows say why.
    ("dkdv", 128, True, 1, None, frozenset({(32, 128, 8, 2), (64, 64, 8, 2)})),
    ("dkdv", 128, True, 2, frozenset({"3.6"}), frozenset({(32, 64, 8, 2)})),
    ("dkdv", 128, False, 2, frozenset({"3.9"}), frozenset({(64, 64, 8, 2)})),
    ("dkdv", 128, False, 2, frozenset({"3.6"}), frozenset({(32, 128, 8, 2)})),
    ("dq", 128, True, 1, frozenset({"3.6"}), frozenset({(128, 64, 8, 2), (128, 64, 8, 3)})),
    ("dkdv_dq", 128, True, 1, None, frozenset({(64, 64, 8, 2)})),
    ("dkdv_dq", 128, True, 1, frozenset({"3.6"}), frozenset({(32, 64, 8, 2), (32, 64, 8, 1)})),
    ("dkdv_dq", 128, False, 2, None, frozenset({(64, 64, 8, 2)})),
    # partial rotary at D64, GQA 4 (the CI subset of bench/static_report, Triton 3.9): 1 / 7 STL / LDL per block
    ("dkdv_dq", 64, True, 2, None, frozenset({(64, 64, 8, 2)})),
]


def known_spills(kind: str, head_dim: int, rotary: bool, group: int, version: str = TRITON_VERSION,
                 table: list | None = None) -> set:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) that spill in their loop for this kernel and Triton
    version, from `table` (default SM90_KNOWN_SPILLS)."""
    out: set = set()
    for k, hd, rot, min_group, versions, cfgs in (SM90_KNOWN_SPILLS if table is None else table):
        if (k, hd, rot) == (kind, head_dim, rotary) and group >= min_group and \
                (versions is None or version in versions):
            out |= cfgs
    return out


def _kind_of(named_args, kwargs) -> str:
    if "FUSED_DQ" in kwargs or "FUSED_DQ" in named_args:
        return "dkdv_dq" if kwargs.get("FUSED_DQ", named_args.get("FUSED_DQ")) else "dkdv"
    return "dq" if "sm_scale" in named_args else "fwd"


def prune_configs(configs, named_args: dict, kwargs: dict, version: str = TRITON_VERSION) -> list:
    """Tiles no larger than the length bucket (see the module docstring) that fit Hopper: shared
    memory by smem_estimate, no known in-loop spill under this Triton (known_spills); exactly one
    bucket-sized tile per sequence when the backward fuses dq (FUSED_DQ). Never empty: the
    smallest tile is the fallback."""
    def arg(name, default=None):
        return launch_arg(named_args, kwargs, name, default)

    bucket = named_args["LEN_BUCKET"]
    head_dim = arg("HEAD_DIM") or 64
    kind = _kind_of(named_args, kwargs)
    spills = known_spills(kind, head_dim, bool(arg("ROTARY", False)), int(arg("GROUP", 1)), version,
                          SM90_KNOWN_SPILLS_TMA if arg("USE_TMA") else SM90_KNOWN_SPILLS)

    def fits(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return (smem_estimate(kind, bm, bn, c.num_stages, head_dim) <= SM90_SMEM_LIMIT
                and (bm, bn, c.num_warps, c.num_stages) not in spills)

    if arg("FUSED_DQ"):
        # One key tile per sequence (BLOCK_N = bucket) makes each dq block complete in one program;
        # the query blocks may be shorter (fewer registers for the transient dS / dq tiles).
        keep = [c for c in configs if c.kwargs["BLOCK_N"] == bucket and c.kwargs["BLOCK_M"] <= bucket
                and (bucket < 64 or c.kwargs["BLOCK_M"] >= 32)]
        assert keep, f"no backward config with {bucket}-row key tiles for the fused dq path"
        return [c for c in keep if fits(c)] or keep[-1:]
    def useful(c):  # on long sequences, small tiles only add programs and re-reads
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        resident, streamed = (bn, bm) if kind.startswith("dkdv") else (bm, bn)
        big = (bucket < 64 or max(bm, bn) >= 32) and \
            (bucket < 256 or (resident >= (64 if kind.startswith("dkdv") else 128) and streamed >= 32))
        # one stage only where there is one query block per head (fused dq); loops want two
        return big and (head_dim < 256 or bm * bn <= 64 * 64) and c.num_stages > 1

    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= bucket and c.kwargs["BLOCK_N"] <= bucket and fits(c) and useful(c)]
    if not keep:
        keep = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]
    return keep


def _prune(configs, named_args, **kwargs):
    return prune_configs(configs, named_args, kwargs)


# Keyed on head dim and length bucket (plus the flags that change the kernel's work).
_KEY = ["HEAD_DIM", "LEN_BUCKET", "GROUP", "CAUSAL", "ROTARY", "ROT_W", "REST_W", "DOT_DTYPE"]
_fwd_launch = gpu_autotune(_FWD_CONFIGS, _KEY + ["USE_TMA"], _prune)(_attn_fwd_kernel)
_dkdv_launch = gpu_autotune(_DKDV_CONFIGS, _KEY + ["FUSED_DQ", "USE_TMA"], _prune)(_attn_bwd_dkdv_kernel)
_dq_launch = gpu_autotune(_DQ_CONFIGS, _KEY + ["USE_TMA"], _prune)(_attn_bwd_dq_kernel)

# The one-kernel backward (_attn_bwd_fused_kernel, deterministic=False). It runs only where the
# fused-dq path does not (max_seqlen > FUSED_DQ_MAX_SEQLEN: length bucket >= 128), so its configs are
# long-sequence tiles: resident key tiles of 64 / 128 rows (the M of the dk / dv products), streamed
# query blocks of 32 / 64. Tile sizes are among _sched_blocks' defaults (16..128): no schedule entry to add.
_FUSED_BWD_CONFIGS = [_cfg(64, 128, 8, 2), _cfg(32, 128, 8, 2), _cfg(64, 64, 4, 2), _cfg(64, 64, 8, 2),
                      _cfg(32, 64, 4, 2), _cfg(32, 64, 8, 2), _cfg(32, 64, 8, 1), _cfg(16, 64, 4, 2),
                      _cfg(16, 128, 8, 2), _cfg(16, 16, 2, 2)]
# In-loop spills of the fused kernel on sm_90a (kind "bwd_fused"; rows as SM90_KNOWN_SPILLS, kept apart
# so the deterministic kernels' table stays as it is), from compiling every config at head dims 64 / 128,
# GROUP 1 / 4, no / full / partial rotary (rotary rows: the union of full and partial), bucket 512 / 1024,
# under Triton 3.9 and 3.6. At D128 the resident dk + dv (fp32) plus k, v leave room for 16-32-row query
# blocks only; (16, 128, 8, 2) is the one tile clean in every case.
SM90_FUSED_BWD_KNOWN_SPILLS: list[tuple[str, int, bool, int, frozenset | None, frozenset]] = [
    ("bwd_fused", 64, False, 2, None, frozenset({(64, 64, 4, 2)})),
    ("bwd_fused", 64, False, 2, frozenset({"3.6"}), frozenset({(64, 128, 8, 2)})),
    ("bwd_fused", 64, True, 2, None, frozenset({(64, 64, 4, 2)})),
    ("bwd_fused", 64, True, 2, frozenset({"3.6"}), frozenset({(64, 64, 8, 2), (64, 128, 8, 2)})),
    ("bwd_fused", 128, False, 1, None, frozenset({(64, 64, 4, 2), (64, 128, 8, 2)})),
    ("bwd_fused", 128, False, 1, frozenset({"3.9"}), frozenset({(64, 64, 8, 2)})),
    ("bwd_fused", 128, False, 1, frozenset({"3.6"}), frozenset({(32, 64, 4, 2)})),
    ("bwd_fused", 128, False, 2, None, frozenset({(32, 128, 8, 2)})),
    ("bwd_fused", 128, False, 2, frozenset({"3.9"}), frozenset({(32, 64, 4, 2)})),
    ("bwd_fused", 128, False, 2, frozenset({"3.6"}), frozenset({(64, 64, 8, 2)})),
    ("bwd_fused", 128, True, 1, None, frozenset({(32, 64, 4, 2), (32, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2),
                                                 (64, 128, 8, 2)})),
    ("bwd_fused", 128, True, 1, frozenset({"3.6"}), frozenset({(16, 64, 4, 2)})),
    ("bwd_fused", 128, True, 2, frozenset({"3.6"}), frozenset({(32, 64, 8, 2)})),
]


# The same for the fused kernel's TMA path (USE_TMA), from the same compiles with descriptors (every config,
# head dims 64 / 128, GROUP 1 / 4, no / full / partial rotary, Triton 3.9 and 3.6). Descriptors free the
# pointer tiles and masks: at D64 and at D128 without rotary they spill less than pointers (e.g. D128 GQA 4,
# 3.9: 32x128 w8 from 10 LDL per block to 1, 64x64 w4 from 81 to 48), but not at D128 with rotary under 3.6,
# where every config spills in its loop at GQA 4 -- those launch on pointers (fused_tma); their rows say why.
SM90_FUSED_BWD_KNOWN_SPILLS_TMA: list[tuple[str, int, bool, int, frozenset | None, frozenset]] = [
    ("bwd_fused", 64, False, 2, frozenset({"3.6"}), frozenset({(64, 64, 4, 2)})),
    ("bwd_fused", 64, True, 2, None, frozenset({(64, 64, 4, 2)})),
    ("bwd_fused", 64, True, 2, frozenset({"3.6"}), frozenset({(64, 128, 8, 2)})),
    ("bwd_fused", 128, False, 1, None, frozenset({(64, 64, 4, 2), (64, 128, 8, 2)})),
    ("bwd_fused", 128, False, 2, None, frozenset({(32, 64, 4, 2), (32, 128, 8, 2), (64, 64, 8, 2)})),
    ("bwd_fused", 128, False, 2, frozenset({"3.6"}), frozenset({(16, 64, 4, 2)})),
    ("bwd_fused", 128, True, 1, None, frozenset({(32, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2)})),
    ("bwd_fused", 128, True, 1, frozenset({"3.6"}), frozenset({(16, 64, 4, 2), (16, 128, 8, 2), (32, 64, 4, 2)})),
    ("bwd_fused", 128, True, 2, frozenset({"3.6"}), frozenset({(32, 64, 8, 1), (32, 64, 8, 2)})),
    ("bwd_fused", 128, True, 2, frozenset({"3.9"}), frozenset({(32, 64, 4, 2)})),
]


def prune_fused_configs(configs, named_args: dict, kwargs: dict, version: str = TRITON_VERSION) -> list:
    """_attn_bwd_fused_kernel's configs: tiles no larger than the length bucket, within shared memory
    (the dk / dv kernel's model: resident k, v; streamed q, dO; dS), no known in-loop spill under this
    Triton, and long-sequence tiles on long sequences. Never empty (the smallest tile is the fallback)."""
    def arg(name, default=None):
        return launch_arg(named_args, kwargs, name, default)

    bucket = named_args["LEN_BUCKET"]
    head_dim = arg("HEAD_DIM") or 64
    spills = known_spills("bwd_fused", head_dim, bool(arg("ROTARY", False)), int(arg("GROUP", 1)), version,
                          SM90_FUSED_BWD_KNOWN_SPILLS_TMA if arg("USE_TMA") else SM90_FUSED_BWD_KNOWN_SPILLS)

    def ok(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return (bm <= bucket and bn <= bucket
                and smem_estimate("dkdv_dq", bm, bn, c.num_stages, head_dim) <= SM90_SMEM_LIMIT
                and (bm, bn, c.num_warps, c.num_stages) not in spills
                and (bucket < 128 or bn >= 64))

    keep = [c for c in configs if ok(c)]
    return keep or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]


def _prune_fused(configs, named_args, **kwargs):
    return prune_fused_configs(configs, named_args, kwargs)


# The autotuner runs each config more than once: the atomic dq buffer must start from zero each time.
_fused_bwd_launch = gpu_autotune(_FUSED_BWD_CONFIGS, _KEY + ["USE_TMA"], _prune_fused, reset_to_zero=["DQ_ACC"])(
    _attn_bwd_fused_kernel)


# ---- the exact (sequence, tile) grid ------------------------------------------------------------

_SCHED_HEADER = 257  # entry BLOCK (<= 256) of the header: where the pair list for tiles of BLOCK rows starts


def _sched_blocks() -> tuple[int, ...]:
    sizes = {16, 32, 64, 128}
    for cfgs in (_FWD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS):
        sizes |= {c.kwargs[k] for c in cfgs for k in ("BLOCK_M", "BLOCK_N")}
    if INTERPRET:
        sizes |= {INTERPRET_CONFIG["BLOCK_M"], INTERPRET_CONFIG["BLOCK_N"]}
    return tuple(sorted(sizes))


class TileSchedule:
    """The (sequence, tile) pairs of a batch for every tile height the configs use, in one int32
    tensor (header + pair lists), with the pair counts and the longest clamped length on the host.

    A grid of B x cdiv(max_seqlen, BLOCK) programs leaves most of them idle on mixed lengths (47%
    on the 64-1,024 mix); this one has exactly one program per tile that holds tokens (plus one
    placeholder for an empty first / last sequence, which zeroes the rows no sequence covers).
    Lengths are clamped exactly as the kernels clamp cu_seqlens, so hostile input with validation
    off still covers every row it can reach."""

    def __init__(self, cu_seqlens: torch.Tensor, T: int):
        dev = cu_seqlens.device
        c = cu_seqlens.long()
        starts = c[:-1].clamp(0, T)
        ends = torch.minimum(torch.maximum(c[1:], starts), torch.full_like(starts, T))
        lens = ends - starts
        B = lens.numel()
        blocks = _sched_blocks()
        n_tiles = []
        for b in blocks:
            nt = (lens + b - 1) // b
            nt[0] = nt[0].clamp(min=1)  # the zeroing duties of the first / last sequence
            nt[-1] = nt[-1].clamp(min=1)
            n_tiles.append(nt)
        # One host read for every count and the longest length (the grid sizes must be known).
        facts = torch.stack([nt.sum() for nt in n_tiles] + [lens.max()]).tolist()
        self.counts = dict(zip(blocks, facts[:-1]))
        self.longest = int(facts[-1])
        header = [0] * _SCHED_HEADER
        parts, off = [], _SCHED_HEADER
        seq_ids = torch.arange(B, device=dev)
        for b, nt in zip(blocks, n_tiles):
            n = self.counts[b]
            header[b] = off
            seq = torch.repeat_interleave(seq_ids, nt, output_size=n)
            first = torch.repeat_interleave(torch.cumsum(nt, 0) - nt, nt, output_size=n)
            tile = torch.arange(n, device=dev) - first
            parts.append(torch.stack([seq, tile], 1).reshape(-1))
            off += 2 * n
        self.table = torch.cat([torch.tensor(header, device=dev)] + parts).to(torch.int32)

    def programs(self, block: int) -> int:
        return self.counts[block]


# Built once per cu_seqlens tensor and version (a model's layers share the batch's cu_seqlens, so
# the schedule's one host sync happens once per batch, not per layer), dropped with the tensor.
_schedules: dict[int, tuple[weakref.ref, int, int, TileSchedule]] = {}


def _forget_schedule(key: int, ref) -> None:
    entry = _schedules.get(key)
    if entry is not None and entry[0] is ref:
        del _schedules[key]


def tile_schedule(cu_seqlens: torch.Tensor, T: int) -> TileSchedule:
    """The batch's TileSchedule, cached per tensor identity + version counter + T (inference
    tensors have no version counter: built each time)."""
    if cu_seqlens.is_inference():
        return TileSchedule(cu_seqlens, T)
    key = id(cu_seqlens)
    entry = _schedules.get(key)
    if entry is not None and entry[0]() is cu_seqlens and entry[1] == cu_seqlens._version and entry[2] == T:
        return entry[3]
    sched = TileSchedule(cu_seqlens, T)
    ref = weakref.ref(cu_seqlens, lambda r, key=key: _forget_schedule(key, r))
    _schedules[key] = (ref, cu_seqlens._version, T, sched)
    return sched


# ---- host launchers ---------------------------------------------------------------------------

def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotary_args(rotary, q, head_dim: int):
    """(cos, sin, HALF, ROTARY, ROT_W, REST_W): the rotary halves are ROT_W-wide pieces (>= 16, the
    tensor cores' K), the rest of the head a REST_W-wide piece (0 when the rotary covers it)."""
    D = q.shape[-1]
    if rotary is None:
        return q, q, 0, False, 16, head_dim
    cos, sin = rotary
    # Tables of any float dtype are read as given and widened in registers: half-precision tables
    # (e.g. built once per batch in the activations' dtype) halve the table bytes; no per-call cast.
    if cos.dtype == torch.float64:
        cos, sin = cos.float(), sin.float()
    half = cos.shape[-1]
    rest = D - 2 * half
    return cos.contiguous(), sin.contiguous(), half, True, max(16, triton.next_power_of_2(half)), \
        (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


# Device-side TMA descriptors for the q / k / v / dO loads of the forward, dk / dv, dq and one-kernel backward
# kernels where the inputs allow (_use_tma); False forces the pointer path everywhere (tests, A/B benchmarks).
TMA = True


def _use_tma(half: int, rotary: bool, *ts: torch.Tensor) -> bool:
    """Whether the attention kernels load these [T, H, D] operands through TMA descriptors (_qk_descs,
    _rows_desc): fp16 / bf16 (fp32 operands take the FMA dot, nothing for TMA to feed), unit last stride,
    base address, token and head strides in bytes multiples of 16 (TMA's rules: every descriptor starts at
    a token row of a head), and the piece widths too (the B / C pieces start HALF / 2 HALF columns in:
    HALF and D - 2 HALF, or D without rotary, times the element size). Sets the scratch allocator the
    descriptors need on a GPU."""
    D = ts[0].shape[-1]
    return TMA and tma_operands(ts, 3, (half, D - 2 * half) if rotary else (D,))


def fused_tma(use_tma: bool, rotary: bool, head_dim: int) -> bool:
    """Whether _attn_bwd_fused_kernel takes the descriptors _use_tma allows. Not with rotary at head dims >= 128:
    under Triton 3.6 every config spills in its loop with descriptors at GQA 4 (partial rotary; full rotary
    keeps only 32x64 w8), where the pointer path keeps 16x128 w8 and 32x64 w8 x1 clean
    (SM90_FUSED_BWD_KNOWN_SPILLS_TMA). Not above 128 either: no static figures there (the resident fp32 dk, dv
    alone fill the registers)."""
    return use_tma and head_dim <= 128 and not (rotary and head_dim >= 128)


def _grid_seqlen(max_seqlen: int, sched: TileSchedule) -> int:
    """max_seqlen as the tile choice sees it: the longest clamped length when the caller's figure
    is too small (validation off) -- the fused-dq path needs every sequence in one tile."""
    return max(int(max_seqlen), sched.longest, 1)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, causal: bool, softmax_scale: float,
                  rotary: tuple[torch.Tensor, torch.Tensor] | None, *, out: torch.Tensor | None = None,
                  lse: torch.Tensor | None = None):
    """Returns (out [T, Hq, D] in q's dtype, lse fp32 [Hq, T]). `out` / `lse` may be given
    (contiguous in the last dim), e.g. views into a larger buffer whose bounds a test watches."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    cu_seqlens = cu_seqlens.contiguous()  # the kernels index it with stride 1
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    B = cu_seqlens.numel() - 1
    if out is None:
        out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    assert out.shape == (T, Hq, D) and out.stride(-1) == 1 and lse.shape == (Hq, T) and lse.is_contiguous()
    if T == 0 or B == 0:  # no sequence covers any row (B == 0 < T only with validation off)
        return out.zero_(), lse.zero_()
    sched = tile_schedule(cu_seqlens, T)
    max_seqlen = _grid_seqlen(max_seqlen, sched)
    head_dim = max(16, triton.next_power_of_2(D))
    cos, sin, half, has_rot, rot_w, rest_w = _rotary_args(rotary, q, head_dim)

    def grid(meta):  # 1-D: query head fastest, then the (sequence, tile) pairs
        return (sched.programs(meta["BLOCK_M"]) * Hq,)

    _fwd_launch[grid](
        q, k, v, out, lse, cu_seqlens, cos, sin, sched.table,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        T, D, half, softmax_scale * LOG2E.value, length_bucket(max_seqlen), B, Hq,
        GROUP=Hq // Hkv, CAUSAL=bool(causal), ROTARY=has_rot, ROT_W=rot_w, REST_W=rest_w, **dot_args(q.dtype),
        HEAD_DIM=head_dim, USE_TMA=_use_tma(half, has_rot, q, k, v), **interpreter_config(INTERPRET_CONFIG))
    return out, lse


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor | None,
                  cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool, softmax_scale: float,
                  rotary: tuple[torch.Tensor, torch.Tensor] | None, *, dq: torch.Tensor | None = None,
                  dk: torch.Tensor | None = None, dv: torch.Tensor | None = None, deterministic: bool = True):
    """Returns (dq, dk, dv) in the dtypes / shapes of q, k, v. dq / dk / dv may be given (contiguous
    in the last dim; see attention_fwd). deterministic (default): no atomics, bit-reproducible.
    deterministic=False: the one-kernel backward (5 products instead of 7, dq summed by fp32 atomics)
    on sequences longer than one tile; short batches (fuse_dq) keep the fused-dq path, which already
    does 5 products without atomics."""
    q, k, v, out, grad_out = (_last_dim_contiguous(x) for x in (q, k, v, out, grad_out))
    cu_seqlens = cu_seqlens.contiguous()
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    B = cu_seqlens.numel() - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else dq
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else dk
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else dv
    assert all(g.shape == x.shape and g.stride(-1) == 1 for g, x in ((dq, q), (dk, k), (dv, v)))
    if T == 0 or B == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    sched = tile_schedule(cu_seqlens, T)
    max_seqlen = _grid_seqlen(max_seqlen, sched)
    head_dim = max(16, triton.next_power_of_2(D))
    delta = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    block_t = 64 if head_dim <= 128 else 32
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, block_t), Hq)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta,
        out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), T, D,
        HAS_DLSE=grad_lse is not None, HEAD_DIM=head_dim, BLOCK=block_t)
    cos, sin, half, has_rot, rot_w, rest_w = _rotary_args(rotary, q, head_dim)
    fused_dq = fuse_dq(max_seqlen)
    common = dict(GROUP=Hq // Hkv, CAUSAL=bool(causal), ROTARY=has_rot, ROT_W=rot_w, REST_W=rest_w,
                  HAS_DLSE=grad_lse is not None, **dot_args(q.dtype), HEAD_DIM=head_dim,
                  **interpreter_config(INTERPRET_CONFIG))
    scalars = (T, D, half, softmax_scale * LOG2E.value, softmax_scale, length_bucket(max_seqlen), B)

    def grid_kv(meta):  # kv head fastest
        return (sched.programs(meta["BLOCK_N"]) * Hkv,)

    use_tma = _use_tma(half, has_rot, q, k, v, grad_out)
    if not deterministic and not fused_dq:  # one kernel, dq by atomics (see _attn_bwd_fused_kernel)
        _attention_bwd_fused(q, k, v, grad_out, lse, delta, dq, dk, dv, cu_seqlens, cos, sin, sched, grid_kv,
                             scalars, Hkv, common, fused_tma(use_tma, has_rot, head_dim))
        return dq, dk, dv
    # dk / dv with rotary at head dims >= 128 stay on pointers: with descriptors every config spills in its
    # loop at GQA 4 under Triton 3.6 (32x64 w8 included; the pointer path's 32x64 does not).
    dkdv_tma = use_tma and not (has_rot and head_dim >= 128)
    _dkdv_launch[grid_kv](
        q, k, v, grad_out, lse, delta, dk, dv, dq, cu_seqlens, cos, sin, sched.table,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        dq.stride(0), dq.stride(1), *scalars, Hkv, FUSED_DQ=fused_dq, USE_TMA=dkdv_tma, **common)
    if fused_dq:
        return dq, dk, dv

    def grid_q(meta):  # query head fastest
        return (sched.programs(meta["BLOCK_M"]) * Hq,)

    _dq_launch[grid_q](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens, cos, sin, sched.table,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1),
        *scalars, Hq, USE_TMA=use_tma, **common)
    return dq, dk, dv


def _attention_bwd_fused(q, k, v, grad_out, lse, delta, dq, dk, dv, cu_seqlens, cos, sin, sched, grid_kv,
                         scalars, Hkv, common, use_tma=False):
    """attention_bwd's deterministic=False branch: _attn_bwd_fused_kernel into a zeroed fp32 dq buffer,
    then one cast pass (scale, inverse rotation, dtype) into dq."""
    T, Hq, D = q.shape
    dq_acc = torch.zeros(T, Hq, D, dtype=torch.float32, device=q.device)
    _fused_bwd_launch[grid_kv](
        q, k, v, grad_out, lse, delta, dk, dv, dq_acc, cu_seqlens, cos, sin, sched.table,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        dq_acc.stride(0), dq_acc.stride(1), *scalars, Hkv, USE_TMA=use_tma, **common)
    sm_scale, half = scalars[4], scalars[2]
    block_t = 64 if common["HEAD_DIM"] <= 128 else 32
    _attn_bwd_dq_cast_kernel[(triton.cdiv(T, block_t), Hq)](
        dq_acc, dq, cos, sin, dq_acc.stride(0), dq_acc.stride(1), dq.stride(0), dq.stride(1), T, D, half, sm_scale,
        ROTARY=common["ROTARY"], ROT_W=common["ROT_W"], REST_W=common["REST_W"], BLOCK=block_t)


__all__ = ["attention_fwd", "attention_bwd", "length_bucket", "tile_schedule"]


# ---- sm_90a waivers (bench/static_report.py, tests/test_static_report.py) ---------------------------
# Configs a launcher may pick that fail a static sm_90a check (bench/results/static-sm90a/report.md),
# each with its reason. The launcher's prune (_prune: shared-memory model, SM90_KNOWN_SPILLS) keeps
# failing configs out of the autotuner, so this list is meant to stay empty.
SM90_WAIVERS: list[dict] = []
