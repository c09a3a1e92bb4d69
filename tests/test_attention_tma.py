"""Both load paths of the attention kernels (_attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel):
device-side TMA descriptors per sequence and head (fp16 / bf16 inputs whose base, strides and rotary piece
widths are 16-byte multiples) and pointer tiles (everything else, or attention.TMA = False), against the
float64 reference by the tolerance rule, with the path the launchers took checked. The interpreter runs
the descriptors on CPU (16 x 16 tiles: lengths 1, 5, 17, 33 straddle tile borders). Small shapes: slow."""
from __future__ import annotations

import pytest
import torch

import embedkit
from conftest import DEVICE
from numerics import assert_by_rule, max_err
from test_attention import NAMES, _cu, _inputs, _run, check_against_reference


def _assert_paths_agree(tma, ptr, lens, Hq, Hkv, D, dtype, rot, seed):
    """The TMA and pointer paths' outputs / gradients agree within twice the low-precision reference's error
    against the fp64 oracle (causal inputs of `seed`)."""
    (q, k, v, g), rotary = _inputs(lens, Hq, Hkv, D, seed, rot)
    q, k, v, g = (x.to(dtype).double() for x in (q, k, v, g))
    oracle = _run("reference", q, k, v, g, _cu(lens), max(lens), dtype=torch.float64, causal=True, rotary=rotary)
    lowp = _run("reference", q, k, v, g, _cu(lens), max(lens), dtype=dtype, causal=True, rotary=rotary)
    for name, a, b, o, lp in zip(NAMES, tma, ptr, oracle, lowp):
        assert max_err(a, b) <= 2.0 * max_err(lp, o) + 1e-5, name


@pytest.fixture
def kernels():
    from embedkit._triton import attention

    return attention


@pytest.fixture
def gate(kernels, monkeypatch):
    """What _use_tma answered for each launch (the USE_TMA the launchers passed)."""
    seen = []
    real = kernels._use_tma

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]
    monkeypatch.setattr(kernels, "_use_tma", spy)
    return seen


LENS = [1, 17, 5, 33]
CASES = [  # (Hq, Hkv, D, dtype, causal, rotary, lens)
    (4, 1, 32, torch.float16, False, None, LENS),           # GQA 4, no rotary: one piece
    (2, 2, 32, torch.bfloat16, True, "1d", LENS),           # full rotary: pieces A, B
    (4, 2, 64, torch.float16, True, "1d-partial", LENS),    # partial rotary: A, B, C
    (4, 1, 32, torch.bfloat16, False, "1d-partial", LENS),  # 16-byte rotary halves (HALF 8)
    (4, 2, 32, torch.float16, True, "1d", [1, 16, 5, 9]),   # every sequence in one tile: fused-dq dk / dv kernel
]


@pytest.mark.parametrize("Hq,Hkv,D,dtype,causal,rotary,lens", CASES,
                         ids=lambda c: str(c).replace("torch.", "").replace(" ", ""))
def test_tma_matches_reference(Hq, Hkv, D, dtype, causal, rotary, lens, gate):
    check_against_reference(lens, Hq, Hkv, D, dtype, causal=causal, rotary=rotary, seed=D + Hq)
    assert gate and all(gate), gate  # forward and backward both took descriptors


def test_tma_strided_qkv(gate):
    """q, k, v as views of one packed [T, 3 H, D] projection (token stride 3 H D, head stride D)."""
    lens, H, D, dtype = [3, 18, 1], 2, 32, torch.bfloat16
    (q, k, v, g), rot = _inputs(lens, H, H, D, seed=7, rotary="1d-partial")
    q, k, v, g = (x.to(dtype).double() for x in (q, k, v, g))
    cu = _cu(lens)
    packed = torch.cat([q, k, v], 1).to(dtype).requires_grad_(True)
    qs, ks, vs = packed[:, :H], packed[:, H:2 * H], packed[:, 2 * H:]
    assert qs.stride() == (3 * H * D, D, 1)
    with embedkit.use_backend("triton"):
        out, lse = embedkit.varlen_attention(qs, ks, vs, cu, max(lens), rotary=rot, return_lse=True)
    dqkv = torch.autograd.grad(out, packed, g.to(dtype))[0]
    got = (out, lse, dqkv[:, :H], dqkv[:, H:2 * H], dqkv[:, 2 * H:])
    assert gate and all(gate), gate
    oracle = _run("reference", q, k, v, g, cu, max(lens), dtype=torch.float64, rotary=rot)
    lowp = _run("reference", q, k, v, g, cu, max(lens), dtype=dtype, rotary=rot)
    for name, a, o, lp in zip(NAMES, got, oracle, lowp):
        assert_by_rule(name, a, o, lp, factor=2.0 if name in ("out", "lse") else 3.0)


def test_tma_gate(kernels, monkeypatch):
    bf = torch.zeros(8, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    assert kernels._use_tma(0, False, bf, bf, bf)
    assert kernels._use_tma(16, True, bf, bf, bf)                      # pieces 32 / 64 bytes
    assert kernels._use_tma(8, True, bf, bf, bf)                       # 16-byte halves
    assert not kernels._use_tma(4, True, bf, bf, bf)                   # 8-byte halves: piece B misaligned
    assert not kernels._use_tma(0, False, bf.float(), bf.float(), bf.float())  # fp32: pointer path
    odd = torch.zeros(8, 2, 40, dtype=torch.bfloat16, device=DEVICE)[..., 1:37]  # base 2 bytes in, 72-byte heads
    assert not kernels._use_tma(0, False, odd, bf[..., :36], bf[..., :36])
    head36 = torch.zeros(8, 2, 36, dtype=torch.float16, device=DEVICE)  # head stride 72 bytes
    assert not kernels._use_tma(0, False, head36, head36, head36)
    wide = torch.zeros(8, 3, 64, dtype=torch.bfloat16, device=DEVICE)[:, :, :36]  # 128-byte strides, 72-byte rows
    assert not kernels._use_tma(0, False, wide, wide, wide)            # D * elem not a 16-byte multiple
    monkeypatch.setattr(kernels, "TMA", False)
    assert not kernels._use_tma(0, False, bf, bf, bf)


def test_misaligned_falls_back_to_pointers(gate):
    """A q whose base is 2 bytes past a 16-byte boundary: the gate refuses, the pointer path is correct."""
    lens, Hq, Hkv, D, dtype = [5, 17], 2, 1, 32, torch.float16
    (q, k, v, g), _ = _inputs(lens, Hq, Hkv, D, seed=3)
    q, k, v, g = (x.to(dtype).double() for x in (q, k, v, g))
    cu = _cu(lens)
    buf = torch.zeros(q.shape[0], Hq, D + 8, dtype=dtype, device=DEVICE)
    buf[..., 1:D + 1] = q.to(dtype)
    qleaf = buf.requires_grad_(True)
    qv = qleaf[..., 1:D + 1]
    assert qv.data_ptr() % 16 != 0 and qv.stride(-1) == 1
    kl, vl = (x.to(dtype).requires_grad_(True) for x in (k, v))
    with embedkit.use_backend("triton"):
        out, lse = embedkit.varlen_attention(qv, kl, vl, cu, max(lens), return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (qleaf, kl, vl), g.to(dtype))
    assert gate and not any(gate), gate
    oracle = _run("reference", q, k, v, g, cu, max(lens), dtype=torch.float64)
    lowp = _run("reference", q, k, v, g, cu, max(lens), dtype=dtype)
    for name, a, o, lp in zip(NAMES, (out, lse, dq[..., 1:D + 1], dk, dv), oracle, lowp):
        assert_by_rule(name, a, o, lp, factor=2.0 if name in ("out", "lse") else 3.0)


def test_forced_pointers_match_tma(kernels, monkeypatch, gate):
    """attention.TMA = False takes the pointer path; its results agree with the TMA path's within the rule."""
    lens, Hq, Hkv, D, dtype, rot = [1, 17, 33], 4, 2, 64, torch.float16, "1d-partial"
    tma = check_against_reference(lens, Hq, Hkv, D, dtype, causal=True, rotary=rot, seed=9)
    assert gate and all(gate)
    gate.clear()
    monkeypatch.setattr(kernels, "TMA", False)
    ptr = check_against_reference(lens, Hq, Hkv, D, dtype, causal=True, rotary=rot, seed=9)
    assert gate and not any(gate)
    _assert_paths_agree(tma, ptr, lens, Hq, Hkv, D, dtype, rot, seed=9)


def test_prune_picks_the_spill_table_of_the_load_path(kernels):
    """prune_configs reads SM90_KNOWN_SPILLS_TMA for USE_TMA launches, SM90_KNOWN_SPILLS otherwise."""
    def kept(kind, head_dim, rotary, group, version, tma):
        configs = {"fwd": kernels._FWD_CONFIGS, "dq": kernels._DQ_CONFIGS}.get(kind, kernels._DKDV_CONFIGS)
        named = {"LEN_BUCKET": 512, **({"sm_scale": 1.0} if kind == "dq" else {}),
                 **({"FUSED_DQ": False} if kind == "dkdv" else {})}
        kw = {"HEAD_DIM": head_dim, "ROTARY": rotary, "GROUP": group, "USE_TMA": tma}
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in kernels.prune_configs(configs, named, kw, version=version)}

    # dq, rotary, D128, Triton 3.6: 128x64 spills with descriptors only
    assert (128, 64, 8, 2) in kept("dq", 128, True, 1, "3.6", False)
    assert (128, 64, 8, 2) not in kept("dq", 128, True, 1, "3.6", True)
    assert (128, 64, 8, 2) in kept("dq", 128, True, 1, "3.9", True)
    # dk / dv, no rotary, D128, GQA 4: 64x64 spills on pointers (any version), with descriptors under 3.9 only
    assert (64, 64, 8, 2) not in kept("dkdv", 128, False, 4, "3.6", False)
    assert (64, 64, 8, 2) in kept("dkdv", 128, False, 4, "3.6", True)
    assert (64, 64, 8, 2) not in kept("dkdv", 128, False, 4, "3.9", True)


# ---- the one-kernel backward (_attn_bwd_fused_kernel, deterministic=False) ---------------------------

@pytest.fixture
def fused_tma(kernels, monkeypatch):
    """The USE_TMA of each _fused_bwd_launch launch (the interpreter's 16 x 16 tiles: any max_seqlen > 16
    takes the one-kernel backward when deterministic=False)."""
    seen = []
    real = kernels._fused_bwd_launch

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["USE_TMA"])
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(kernels, "_fused_bwd_launch", Spy())
    return seen


FUSED_CASES = [  # (Hq, Hkv, D, dtype, causal, rotary, lens): every max_seqlen > 16, so more than one key tile
    (4, 1, 32, torch.float16, True, None, LENS),            # GQA 4, no rotary
    (2, 2, 32, torch.bfloat16, False, "1d", LENS),          # GQA 1, full rotary
    (4, 1, 64, torch.float16, True, "1d-partial", LENS),    # GQA 4, partial rotary: pieces A, B, C
    (2, 2, 32, torch.bfloat16, True, "1d-partial", [33, 1, 1, 20]),  # GQA 1, 1-token sequences mid-batch
]


@pytest.mark.parametrize("Hq,Hkv,D,dtype,causal,rotary,lens", FUSED_CASES,
                         ids=lambda c: str(c).replace("torch.", "").replace(" ", ""))
def test_fused_backward_tma_matches_reference(Hq, Hkv, D, dtype, causal, rotary, lens, fused_tma):
    check_against_reference(lens, Hq, Hkv, D, dtype, causal=causal, rotary=rotary, seed=D + Hq + 1,
                            deterministic=False)
    assert fused_tma == [True], fused_tma  # the one-kernel backward ran, on descriptors


def test_fused_backward_forced_pointers_match_tma(kernels, monkeypatch, fused_tma):
    """attention.TMA = False: the one-kernel backward on pointers; its gradients agree with the TMA path's."""
    lens, Hq, Hkv, D, dtype, rot = [17, 1, 33], 4, 2, 64, torch.bfloat16, "1d"
    tma = check_against_reference(lens, Hq, Hkv, D, dtype, causal=True, rotary=rot, seed=11, deterministic=False)
    monkeypatch.setattr(kernels, "TMA", False)
    ptr = check_against_reference(lens, Hq, Hkv, D, dtype, causal=True, rotary=rot, seed=11, deterministic=False)
    assert fused_tma == [True, False], fused_tma
    _assert_paths_agree(tma, ptr, lens, Hq, Hkv, D, dtype, rot, seed=11)


def test_fused_backward_gate(kernels):
    """fused_tma: descriptors where _use_tma allows them, except rotary at head dims >= 128 (every config spills in
    its loop there at GQA 4 under Triton 3.6) and head dims above 128 (no static figures)."""
    assert kernels.fused_tma(True, False, 64) and kernels.fused_tma(True, True, 64)
    assert kernels.fused_tma(True, False, 128) and not kernels.fused_tma(True, True, 128)
    assert not kernels.fused_tma(True, False, 256) and not kernels.fused_tma(False, False, 64)


def test_fused_backward_prune_picks_the_spill_table_of_the_load_path(kernels):
    """prune_fused_configs reads SM90_FUSED_BWD_KNOWN_SPILLS_TMA for USE_TMA launches, SM90_FUSED_BWD_KNOWN_SPILLS
    otherwise; with descriptors no kept config is in the TMA table, and the prune is never empty where they launch."""
    def kept(head_dim, rotary, group, version, tma):
        kw = {"HEAD_DIM": head_dim, "ROTARY": rotary, "GROUP": group, "USE_TMA": tma}
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in kernels.prune_fused_configs(kernels._FUSED_BWD_CONFIGS, {"LEN_BUCKET": 1024}, kw,
                                                     version=version)}

    # D128 no rotary, GQA 1: 64x64 w8 spills on pointers under 3.9, not with descriptors
    assert (64, 64, 8, 2) not in kept(128, False, 1, "3.9", False)
    assert (64, 64, 8, 2) in kept(128, False, 1, "3.9", True)
    # D128 no rotary, GQA 4: 16x64 w4 spills with descriptors under 3.6 only
    assert (16, 64, 4, 2) in kept(128, False, 4, "3.6", False)
    assert (16, 64, 4, 2) not in kept(128, False, 4, "3.6", True)
    assert (16, 64, 4, 2) in kept(128, False, 4, "3.9", True)
    # D64 rotary, GQA 4, 3.6: 64x64 w8 spills on pointers only, 64x128 w8 on both
    assert (64, 64, 8, 2) not in kept(64, True, 4, "3.6", False)
    assert (64, 64, 8, 2) in kept(64, True, 4, "3.6", True)
    assert (64, 128, 8, 2) not in kept(64, True, 4, "3.6", True)
    for version in ("3.6", "3.9"):
        for hd in (64, 128):
            for rotary in (False, True):
                for group in (1, 4):
                    if not kernels.fused_tma(True, rotary, hd):
                        continue
                    spills = kernels.known_spills("bwd_fused", hd, rotary, group, version,
                                                  kernels.SM90_FUSED_BWD_KNOWN_SPILLS_TMA)
                    got = kept(hd, rotary, group, version, True)
                    assert got and not got & spills and all(c[1] >= 64 for c in got), (version, hd, rotary, group)
