"""Attention kernels beyond the flash-attn suite (tests/test_attention.py): memory safety with
validation off (issue 12), exact zeros for single-key rows, head dims that are not multiples of 8,
NumPy scalars, the flash-attn drop-in's details (issue 14). Tiny shapes: the interpreter is slow.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import embedkit
from conftest import DEVICE
from test_attention import _cu, _inputs, _run, check_against_reference

CANARY = 12345.0


@pytest.fixture
def validation_off():
    embedkit.set_validation(False)
    try:
        yield
    finally:
        embedkit.set_validation(True)


def _embedded(shape, dtype, pad=40, fill=CANARY):
    """A tensor of `shape` inside a larger buffer (pad rows before and after, filled with `fill`)."""
    T = shape[0]
    buf = torch.full((T + 2 * pad, *shape[1:]), fill, dtype=dtype, device=DEVICE)
    return buf, buf[pad:pad + T]


BAD_CU = {  # T = 24 tokens
    "last > T": [0, 10, 60],
    "negative": [0, -30, 24],
    "decreasing": [0, 20, 5, 24],
    "huge": [0, 2 ** 31 - 1, 24],
    "last < T": [0, 7, 13],
    "first > 0": [5, 12, 24],
}


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", list(BAD_CU))
def test_bad_cu_seqlens_stay_in_bounds(name, causal, deterministic):
    """Validation off, hostile cu_seqlens: every kernel reads and writes inside its tensors only.
    Inputs live in NaN-padded buffers (an out-of-bounds read would bring NaN into the results),
    outputs and gradients in canary-padded buffers (an out-of-bounds write would change them)."""
    from embedkit._triton import attention as kernels

    T, Hq, Hkv, D = 24, 4, 2, 16
    cu = torch.tensor(BAD_CU[name], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    ins = []
    for h in (Hq, Hkv, Hkv, Hq):
        _, x = _embedded((T, h, D), torch.float32, fill=float("nan"))
        x.copy_(torch.randn(T, h, D, generator=gen))
        ins.append(x)
    q, k, v, g = ins
    cos, sin = embedkit.rotary_tables(torch.arange(T, device=DEVICE), D)
    for max_seqlen in (24, 2 ** 31 - 1, 3):
        obuf, out = _embedded((T, Hq, D), torch.float32)
        lbuf = torch.full((Hq * T + 80,), CANARY, device=DEVICE)
        lse = lbuf[40:40 + Hq * T].view(Hq, T)
        kernels.attention_fwd(q, k, v, cu, max_seqlen, causal, 0.25, (cos, sin), out=out, lse=lse)
        bufs = [_embedded(x.shape, torch.float32) for x in (q, k, v)]
        kernels.attention_bwd(g, q, k, v, out, lse, None, cu, max_seqlen, causal, 0.25, (cos, sin),
                              dq=bufs[0][1], dk=bufs[1][1], dv=bufs[2][1], deterministic=deterministic)
        for what, buf, x in [("out", obuf, out), ("dq", *bufs[0]), ("dk", *bufs[1]), ("dv", *bufs[2])]:
            assert (buf[:40] == CANARY).all() and (buf[40 + T:] == CANARY).all(), f"{what}: canary overwritten"
            assert torch.isfinite(x).all(), f"{what}: out-of-bounds read or uninitialised rows"
        assert (lbuf[:40] == CANARY).all() and (lbuf[40 + Hq * T:] == CANARY).all(), "lse: canary overwritten"
        assert torch.isfinite(lse).all()


@pytest.mark.parametrize("max_seqlen,deterministic", [(11, True), (24, False)], ids=["det", "atomic"])
@pytest.mark.parametrize("cu_list,covered", [([0, 7, 13], (0, 13)), ([5, 12, 24], (5, 24))])
def test_rows_no_sequence_covers_are_zero(validation_off, cu_list, covered, max_seqlen, deterministic):
    """cu_seqlens[-1] < T or cu_seqlens[0] > 0 (validation off): the rows outside every sequence
    come back as zeros (out, lse and gradients), never as uninitialised memory. (max_seqlen 24 with
    deterministic=False: the one-kernel backward, whose dq rows come from the zeroed atomic buffer.)"""
    T = 24
    (q, k, v, g), _ = _inputs([T], 2, 1, 16, seed=1)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=DEVICE)
    # Fill the allocator's cache with garbage of the right size first.
    del_me = [torch.full((T, 2, 16), 7.0, device=DEVICE) for _ in range(4)]
    del del_me
    out, lse, dq, dk, dv = _run("triton", q, k, v, g, cu, max_seqlen, dtype=torch.float32,
                                deterministic=deterministic)
    lo, hi = covered
    outside = torch.ones(T, dtype=torch.bool)
    outside[lo:hi] = False
    for name, x in [("out", out), ("dq", dq), ("dk", dk), ("dv", dv)]:
        assert (x[outside] == 0).all(), name
    assert (lse[:, outside] == 0).all()
    # The covered rows are the attention of those sequences alone.
    alone = _run("triton", q[lo:hi], k[lo:hi], v[lo:hi], g[lo:hi], cu - lo, max_seqlen, dtype=torch.float32,
                 deterministic=deterministic)
    for a, b in zip((out, dq, dk, dv), alone[:1] + alone[2:]):
        assert torch.equal(a[lo:hi], b)


def test_max_seqlen_too_small_still_computes_every_row(validation_off):
    """Validation off and max_seqlen below the longest sequence: each program loops over the tiles
    of its sequence, so the result is the one of the right max_seqlen (no unwritten rows)."""
    lens = [40, 9, 23]
    (q, k, v, g), rot = _inputs(lens, 2, 1, 16, seed=2, rotary="1d")
    cu = _cu(lens)
    want = _run("triton", q, k, v, g, cu, 40, dtype=torch.float32, rotary=rot)
    got = _run("triton", q, k, v, g, cu, 17, dtype=torch.float32, rotary=rot)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_single_key_rows_have_exactly_zero_dq_dk(causal, dtype, deterministic):
    """A 1-token sequence (and, when causal, every sequence's first token) has softmax == 1: the
    exact dq, and that row's contribution to dk, is 0 -- bit for bit, not ~1e-6."""
    lens = [1, 6, 1, 19, 1]
    (q, k, v, g), _ = _inputs(lens, 2, 1, 16, seed=4)
    cu = _cu(lens)
    _, _, dq, dk, _ = _run("triton", q, k, v, g, cu, 19, dtype=dtype, causal=causal, deterministic=deterministic)
    singles = cu[:-1][torch.tensor(lens) == 1].long()
    assert (dq[singles] == 0).all() and (dk[singles] == 0).all()
    if causal:
        assert (dq[cu[:-1].long()] == 0).all()


@pytest.mark.parametrize("D", [59, 111, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_head_dims_not_multiple_of_8(D, dtype):
    """flash-attn accepts such head dims; the kernels run them in a masked power-of-two tile."""
    check_against_reference([5, 18], 2, 1, D, dtype, seed=D)


@pytest.mark.parametrize("rotary", ["1d", "1d-partial"])
def test_head_dim_60_with_rotary(rotary):
    check_against_reference([5, 18], 2, 1, 60, torch.float32, rotary=rotary, seed=9)


def test_half_precision_rotary_tables():
    """cos / sin in fp16 are read as given (no per-call cast) and match the reference on them."""
    lens = [7, 20]
    (q, k, v, g), (cos, sin) = _inputs(lens, 2, 2, 32, seed=3, rotary="1d")
    cu = _cu(lens)
    rot16 = (cos.half(), sin.half())
    got = _run("triton", q, k, v, g, cu, 20, dtype=torch.float16, rotary=rot16)
    want = _run("triton", q, k, v, g, cu, 20, dtype=torch.float16, rotary=tuple(x.float() for x in rot16))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_numpy_scalars_accepted():
    lens = [5, 11]
    (q, k, v, g), _ = _inputs(lens, 2, 1, 16, seed=5)
    cu = _cu(lens)
    with embedkit.use_backend("triton"):
        want = embedkit.varlen_attention(q, k, v, cu, 11, causal=True)
        got = embedkit.varlen_attention(q, k, v, cu, np.int64(11), causal=np.bool_(True))
        fa = embedkit.flash_attn_varlen_func(q, k, v, cu, cu, np.int32(11), np.int32(11), causal=np.bool_(True),
                                             deterministic=np.bool_(True))
    assert torch.equal(got, want) and torch.equal(fa, want)
    with pytest.raises(TypeError, match="causal must be a bool, got str"):
        embedkit.varlen_attention(q, k, v, cu, 11, causal="yes")
    with pytest.raises(TypeError, match=r"causal must be a bool, got numpy\..*int"):
        embedkit.varlen_attention(q, k, v, cu, 11, causal=np.int64(1))


def test_flash_attn_window_size_none_and_rotary_theta_inf():
    lens = [5, 11]
    (q, k, v, _), _ = _inputs(lens, 2, 1, 16, seed=6)
    cu = _cu(lens)
    with pytest.raises(TypeError, match="window_size"):
        embedkit.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, window_size=None)
    for theta in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="theta"):
            embedkit.rotary_tables(torch.arange(4), 8, theta=theta)
    with pytest.raises(TypeError, match="theta"):
        embedkit.rotary_tables(torch.arange(4), 8, theta="big")


def test_flash_attn_return_attn_probs_is_empty_tensor():
    lens = [5, 11]
    (q, k, v, _), _ = _inputs(lens, 2, 1, 16, seed=7)
    cu = _cu(lens)
    with embedkit.use_backend("triton"):
        out, lse, probs = embedkit.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11, return_attn_probs=True)
    assert isinstance(probs, torch.Tensor) and probs.numel() == 0 and probs.device == q.device


def test_flash_attn_same_cu_seqlens_view_does_not_compare_contents(monkeypatch):
    """cu_seqlens_k a different Python object viewing the same memory as cu_seqlens_q (what a
    model passing `cu, cu.view(-1)` does per layer): no torch.equal, i.e. no device sync."""
    lens = [5, 11]
    (q, k, v, _), _ = _inputs(lens, 2, 1, 16, seed=8)
    cu = _cu(lens)
    calls = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: calls.append(1) or real_equal(a, b))
    embedkit.set_validation(False)
    try:
        with embedkit.use_backend("triton"):
            embedkit.flash_attn_varlen_func(q, k, v, cu, cu.view(-1), 11, 11)
            embedkit.flash_attn_varlen_func(q, k, v, cu, cu, 11, 11)
        assert calls == []
        with embedkit.use_backend("triton"):
            embedkit.flash_attn_varlen_func(q, k, v, cu, cu.clone(), 11, 11)  # another tensor: compared
        assert calls == [1]
    finally:
        embedkit.set_validation(True)


# ---- the exact (sequence, tile) grid (issue 14) -----------------------------------------------------

def _expected_pairs(lens, block):
    pairs = []
    for i, n in enumerate(lens):
        nt = -(-n // block)
        if i in (0, len(lens) - 1):
            nt = max(nt, 1)  # a placeholder tile zeroes the rows no sequence covers
        pairs += [(i, t) for t in range(nt)]
    return pairs


@pytest.mark.parametrize("lens", [[0, 1, 33, 0, 16, 17, 1, 0, 5, 0], [40], [0], [1, 0, 0, 64, 2]])
def test_tile_schedule_lists_exactly_the_tiles_that_hold_tokens(lens):
    from embedkit._triton import attention as kernels

    cu = _cu(lens, "cpu")
    sched = kernels.TileSchedule(cu, sum(lens))
    table = sched.table.tolist()
    assert sched.longest == max(lens)
    for block in kernels._sched_blocks():
        want = _expected_pairs(lens, block)
        off = table[block]
        got = [tuple(table[off + 2 * i: off + 2 * i + 2]) for i in range(sched.programs(block))]
        assert got == want, block


def test_tile_schedule_clamps_like_the_kernels():
    """Validation off: lengths from the clamped cu_seqlens (negative / decreasing / past T)."""
    from embedkit._triton import attention as kernels

    sched = kernels.TileSchedule(torch.tensor([0, -30, 50, 20], dtype=torch.int32), 24)
    # starts 0, 0, 24 and ends 0, 24, 24 -> lengths 0, 24, 0
    assert sched.longest == 24
    table = sched.table.tolist()
    off = table[16]
    assert [tuple(table[off + 2 * i: off + 2 * i + 2]) for i in range(sched.programs(16))] == \
        [(0, 0), (1, 0), (1, 1), (2, 0)]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("group", [1, 2])
def test_exact_grid_lengths_zero_one_and_tile_borders(causal, group):
    """Values and gradients on the exact grid: empty sequences (first, last, inside), single
    tokens, lengths at and across the 16-row tile borders, GQA."""
    check_against_reference([0, 1, 33, 0, 16, 17, 1, 0, 5, 0], 2 * group, 2, 16, torch.float16, causal=causal,
                            seed=30 + group)


def test_exact_grid_rotary_partial_gqa_causal():
    check_against_reference([0, 1, 18, 0, 3], 4, 1, 32, torch.float16, causal=True, rotary="1d-partial", seed=40)


def test_tile_schedule_built_once_per_batch(monkeypatch):
    """The schedule's host read happens once per cu_seqlens tensor (and again after an in-place
    write), not once per layer: forward + backward of four 'layers' read it once."""
    from test_safety_memory import _count_syncs
    from embedkit._triton import attention as kernels

    lens = [3, 0, 17, 9]
    (q, k, v, g), _ = _inputs(lens, 2, 1, 16, seed=3)
    cu = _cu(lens)

    def layers(n):
        for _ in range(n):
            _run("triton", q, k, v, g, cu, max(lens), dtype=torch.float32)

    embedkit.set_validation(False)  # count the kernels' own syncs only
    try:
        kernels._schedules.clear()
        assert _count_syncs(lambda: layers(1), monkeypatch) == 1
        assert _count_syncs(lambda: layers(3), monkeypatch) == 0
        cu[-1] = cu[-1].item()  # an in-place write moves the version counter: built again
        assert _count_syncs(lambda: layers(2), monkeypatch) == 1
    finally:
        embedkit.set_validation(True)


def test_model_forward_syncs_do_not_grow_with_depth_on_triton(monkeypatch):
    """The issue's check with the Triton attention (exact grid + validation on): a model forward
    makes the same number of host syncs at 1 and 3 layers."""
    from test_safety_memory import _count_syncs
    from embedkit._triton import attention as kernels

    counts = {}
    for layers in (1, 3):
        torch.manual_seed(0)
        model = embedkit.Embedder(embedkit.EmbedderConfig.tiny(num_layers=layers)).eval()
        with torch.no_grad(), embedkit.use_backend("triton"):
            inputs = model.processor(["a short text", "another, somewhat longer, text input"], task="search")
            kernels._schedules.clear()
            counts[layers] = _count_syncs(lambda: model(inputs, dim=32), monkeypatch)
    assert counts[1] == counts[3], f"host syncs per forward by depth: {counts}"


# ---- dk / dv over diagonal, full and tail query blocks ---------------------------------------------

@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("rotary", [None, "1d"], ids=["norot", "rot"])
@pytest.mark.parametrize("lens", [[0, 1, 16, 17, 33, 0], [16, 1, 0, 16, 5]], ids=["split-dq", "fused-dq"])
def test_dkdv_full_and_masked_blocks(lens, rotary, causal, deterministic):
    """dk / dv (and dq) against the oracle where query blocks straddle the causal diagonal, lie
    wholly past it, or hold the sequence's tail: 33 tokens give two full key tiles with full query
    blocks past the diagonal and a partial key tile; the 16-token sequences run the fused-dq path
    with one full block. (The guard for a kernel that skips the score mask on full blocks.)"""
    check_against_reference(lens, 4, 2, 32, torch.float16, causal=causal, rotary=rotary, seed=50 + len(lens),
                            deterministic=deterministic)


def test_dkdv_full_blocks_deterministic():
    (q, k, v, g), rot = _inputs([33, 17], 4, 2, 32, seed=60, rotary="1d")
    cu = _cu([33, 17])
    a = _run("triton", q, k, v, g, cu, 33, dtype=torch.float16, causal=True, rotary=rot)
    b = _run("triton", q, k, v, g, cu, 33, dtype=torch.float16, causal=True, rotary=rot)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---- the Hopper prune: version- and group-aware known spills --------------------------------------

def _prune_kept(kind, bucket, head_dim, rotary, group, version, fused=False):
    from embedkit._triton import attention as kernels

    configs = {"fwd": kernels._FWD_CONFIGS, "dq": kernels._DQ_CONFIGS}.get(kind, kernels._DKDV_CONFIGS)
    named = {"LEN_BUCKET": bucket, **({"sm_scale": 1.0} if kind == "dq" else {}),
             **({"FUSED_DQ": fused} if kind.startswith("dkdv") else {})}
    kw = {"HEAD_DIM": head_dim, "ROTARY": rotary, "GROUP": group}
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in kernels.prune_configs(configs, named, kw, version=version)}


def test_prune_drops_known_spills_per_triton_version_and_group():
    from embedkit._triton import attention as kernels

    # fused dq, GQA 4, rotary, 64-row key tiles: the w8 s2 tiles spill under Triton 3.6 only
    for hd in (64, 128):
        k36 = _prune_kept("dkdv_dq", 64, hd, True, 4, "3.6", fused=True)
        k39 = _prune_kept("dkdv_dq", 64, hd, True, 4, "3.9", fused=True)
        assert (32, 64, 8, 2) not in k36 and (32, 64, 8, 2) in k39, (hd, k36, k39)
        assert k36 and all(c[1] == 64 for c in k36)
        for c in k36:
            assert c not in kernels.known_spills("dkdv_dq", hd, True, 4, "3.6")
        # MHA keeps them under 3.6 too
        assert (32, 64, 8, 2) in _prune_kept("dkdv_dq", 64, hd, True, 1, "3.6", fused=True)
    # dk / dv 64x64 w8 at D128 without rotary spills at GROUP 4, not at GROUP 1
    assert (64, 64, 8, 2) in _prune_kept("dkdv", 1024, 128, False, 1, "3.9")
    assert (64, 64, 8, 2) not in _prune_kept("dkdv", 1024, 128, False, 4, "3.9")
    assert kernels.known_spills("dkdv_dq", 64, True, 4, "3.6") and not kernels.known_spills("dkdv_dq", 64, True, 4, "3.9")


def test_fused_backward_prune_drops_its_known_spills():
    """The one-kernel backward's prune (deterministic=False): never empty, long-sequence key tiles,
    and none of the configs its table says spill in the loop, for each Triton version."""
    from embedkit._triton import attention as kernels

    for version in ("3.6", "3.9"):
        for hd in (64, 128):
            for rotary in (False, True):
                for group in (1, 4):
                    spills = set()
                    for k, h, rot, min_group, versions, cfgs in kernels.SM90_FUSED_BWD_KNOWN_SPILLS:
                        if (h, rot) == (hd, rotary) and group >= min_group and (versions is None or version in versions):
                            spills |= cfgs
                    kept = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                            for c in kernels.prune_fused_configs(kernels._FUSED_BWD_CONFIGS, {"LEN_BUCKET": 1024},
                                                                 {"HEAD_DIM": hd, "ROTARY": rotary, "GROUP": group},
                                                                 version=version)}
                    assert kept and not kept & spills and all(c[1] >= 64 for c in kept), (version, hd, rotary, group)
    # D128 + rotary + GQA 4 under Triton 3.6: only the tiles that compile without in-loop spills
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in kernels.prune_fused_configs(kernels._FUSED_BWD_CONFIGS, {"LEN_BUCKET": 1024},
                                                 {"HEAD_DIM": 128, "ROTARY": True, "GROUP": 4}, version="3.6")} == \
        {(32, 64, 8, 1), (16, 128, 8, 2)}
