"""varlen_attention (Triton backend) against the pure-torch reference, by the design's tolerance rule.

Oracle = the reference on float64 inputs; low-precision reference = the reference on the input dtype.
Checked: out, lse, dq, dk, dv; bidirectional and causal; GQA groups 1, 2, 4, 8; head dims 32, 64,
80, 128, 256; rotary from 1-D and 3-axis positions; hypothesis-generated length lists; isolation
between sequences; deterministic backward; every bad input; torch.compile(fullgraph=True).

Under the interpreter the kernels run with 16 x 16 tiles (embedkit._triton.attention.INTERPRET_CONFIG),
so lengths 15, 16, 17, 31, 32, 33 straddle tile borders.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import embedkit
from conftest import DEVICE
from numerics import assert_by_rule, grads, leaf

NAMES = ("out", "lse", "dq", "dk", "dv")
LOWP = (torch.float16, torch.bfloat16)


def _cu(lens, device=DEVICE):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def _rotary(kind, lens, D, gen, device=DEVICE):
    """None, or (cos, sin) for: "1d" (R = D), "1d-partial" (R = D / 2), "3axis" (R = D, sections)."""
    if kind is None:
        return None
    T = sum(lens)
    if kind == "3axis":
        pos = torch.randint(0, 40, (3, T), generator=gen).to(device)
        half = D // 2
        sections = (half - 2 * (half // 3), half // 3, half // 3)
        return embedkit.rotary_tables(pos, D, sections=sections)
    pos = torch.cat([torch.arange(n) for n in lens]).to(device) if T else torch.zeros(0, dtype=torch.long)
    return embedkit.rotary_tables(pos, D if kind == "1d" else D // 2, theta=500.0)


def _inputs(lens, Hq, Hkv, D, seed, rotary=None, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v, g = (torch.randn(T, h, D, generator=gen) for h in (Hq, Hkv, Hkv, Hq))
    return [x.to(device) for x in (q, k, v, g)], _rotary(rotary, lens, D, gen, device)


def _run(backend, q, k, v, g, cu, max_seqlen, *, dtype, causal=False, rotary=None, scale=None, g_lse=None,
         deterministic=True):
    q, k, v = leaf(q, dtype), leaf(k, dtype), leaf(v, dtype)
    with embedkit.use_backend(backend):
        out, lse = embedkit.varlen_attention(q, k, v, cu, max_seqlen, causal=causal, softmax_scale=scale,
                                             rotary=rotary, return_lse=True, deterministic=deterministic)
    if g_lse is None:
        dq, dk, dv = grads(out, (q, k, v), g)
    else:
        dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (g.to(out.dtype), g_lse.to(lse.dtype)))
    return out, lse, dq, dk, dv


def check_against_reference(lens, Hq, Hkv, D, dtype, *, causal=False, rotary=None, seed=0, scale=None,
                            with_lse_grad=False, device=DEVICE, deterministic=True):
    (q, k, v, g), rot = _inputs(lens, Hq, Hkv, D, seed, rotary, device)
    # The oracle sees the same (rounded) inputs as the kernel: only the computation is compared.
    q, k, v, g = (x.to(dtype).double() for x in (q, k, v, g))
    cu = _cu(lens, device)
    max_seqlen = max(lens) if lens else 0
    g_lse = torch.randn(Hq, sum(lens), generator=torch.Generator().manual_seed(seed + 1)).to(device) \
        if with_lse_grad else None
    kw = dict(causal=causal, rotary=rot, scale=scale, g_lse=g_lse)
    got = _run("triton", q, k, v, g, cu, max_seqlen, dtype=dtype, deterministic=deterministic, **kw)
    oracle = _run("reference", q, k, v, g, cu, max_seqlen, dtype=torch.float64, **kw)
    lowp = _run("reference", q, k, v, g, cu, max_seqlen, dtype=dtype, **kw)
    for name, a, o, lp in zip(NAMES, got, oracle, lowp):
        assert a.dtype == (torch.float32 if name == "lse" else dtype), name
        assert_by_rule(name, a, o, lp, factor=2.0 if name in ("out", "lse") else 3.0)
    return got


# ---- values and gradients ---------------------------------------------------------------------

SHAPES = [  # (Hq, Hkv, D): GQA groups 1, 2, 4, 8 and head dims 32, 64, 80, 128 (256 below)
    (2, 2, 32), (4, 2, 64), (4, 1, 80), (8, 1, 32), (2, 1, 128),
]
# Every shape in fp16; fp32 and bf16 (bf16 dots are widened under the interpreter) on a subset, to
# keep the interpreter's run time small.
CASES = [(shape, torch.float16) for shape in SHAPES] + [
    (SHAPES[1], torch.float32), (SHAPES[2], torch.float32), (SHAPES[1], torch.bfloat16), (SHAPES[3], torch.bfloat16)]


# deterministic=False: the one-kernel backward (dq by atomics) wherever max_seqlen > one tile.
DET = pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])


@DET
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda c: str(c).replace("torch.", "").replace(" ", ""))
def test_matches_reference(shape, dtype, causal, deterministic):
    Hq, Hkv, D = shape
    check_against_reference([5, 17, 1, 33], Hq, Hkv, D, dtype, causal=causal, seed=D + Hq,
                            deterministic=deterministic)


@DET
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_head_dim_256(causal, dtype, deterministic):
    check_against_reference([3, 18], 2, 1, 256, dtype, causal=causal, seed=3, deterministic=deterministic)


ROTARY_CASES = [(kind, D, torch.float16) for kind, D in
                 [("1d", 32), ("1d-partial", 32), ("1d", 80), ("3axis", 64), ("3axis", 48)]] + [
    ("1d", 32, torch.float32), ("3axis", 48, torch.float32), ("1d", 64, torch.bfloat16),
    ("1d-partial", 32, torch.bfloat16)]


@DET
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("rotary,D,dtype", ROTARY_CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_rotary(rotary, D, causal, dtype, deterministic):
    # Full (R = D) and partial (R < D) rotary take the same path: the two rotary halves and the rest
    # of the head are separate column pieces. (deterministic=False: dq summed in the rotated frame,
    # rotated back once in the cast pass.)
    check_against_reference([7, 20, 2], 4, 2, D, dtype, causal=causal, rotary=rotary, seed=11,
                            deterministic=deterministic)


@DET
def test_custom_scale_and_lse_gradient(deterministic):
    check_against_reference([9, 21], 2, 1, 32, torch.float32, scale=0.37, with_lse_grad=True, seed=5,
                            deterministic=deterministic)
    check_against_reference([9, 21], 2, 2, 32, torch.float16, causal=True, rotary="1d", with_lse_grad=True,
                            seed=6, deterministic=deterministic)


lengths = st.lists(st.integers(1, 40), min_size=1, max_size=6)


@settings(max_examples=8)
@given(lens=lengths, causal=st.booleans(), group=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float32, torch.float16]), deterministic=st.booleans())
@example(lens=[1], causal=False, group=1, seed=0, dtype=torch.float32, deterministic=True)  # one 1-token sequence
@example(lens=[40], causal=True, group=2, seed=1, dtype=torch.float16, deterministic=True)  # a single sequence
@example(lens=[40], causal=True, group=2, seed=1, dtype=torch.float16, deterministic=False)
@example(lens=[15, 16, 17, 31, 32, 33], causal=False, group=1, seed=2, dtype=torch.float32,  # tile borders
         deterministic=True)
@example(lens=[15, 16, 17, 31, 32, 33], causal=True, group=2, seed=3, dtype=torch.float16, deterministic=True)
@example(lens=[15, 16, 17, 31, 32, 33], causal=True, group=2, seed=3, dtype=torch.float16, deterministic=False)
@example(lens=[1, 1, 1, 2, 1], causal=True, group=1, seed=4, dtype=torch.float16, deterministic=True)
def test_hypothesis_lengths(lens, causal, group, seed, dtype, deterministic):
    check_against_reference(lens, 2 * group, 2, 16, dtype, causal=causal, seed=seed, deterministic=deterministic)


def test_many_short_sequences(monkeypatch):
    """The issue's case: 200 sequences of 1-40 tokens, small head count and dim to keep it quick, with
    64 x 64 tiles: one tile per sequence, the regime the GPU autotuner picks for short sequences."""
    from embedkit._triton import attention as kernels

    monkeypatch.setitem(kernels.INTERPRET_CONFIG, "BLOCK_M", 64)
    monkeypatch.setitem(kernels.INTERPRET_CONFIG, "BLOCK_N", 64)
    gen = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 41, (200,), generator=gen).tolist()
    check_against_reference(lens, 1, 1, 16, torch.float16, causal=False, rotary="1d", seed=7)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fused_dq_backward(monkeypatch, causal):
    """Sequences that fit in one tile: dq comes out of the dk / dv kernel (no separate dq kernel)."""
    from embedkit._triton import attention as kernels

    monkeypatch.setitem(kernels.INTERPRET_CONFIG, "BLOCK_M", 32)
    monkeypatch.setitem(kernels.INTERPRET_CONFIG, "BLOCK_N", 32)
    assert kernels.fuse_dq(32) and not kernels.fuse_dq(33)
    check_against_reference([1, 9, 30, 32], 4, 2, 32, torch.float16, causal=causal, rotary="1d", seed=21)


def test_empty_sequences():
    check_against_reference([0, 5, 0, 0, 12, 0], 2, 1, 16, torch.float32, seed=8)
    check_against_reference([0, 5, 0, 0, 12, 0], 2, 1, 16, torch.float16, causal=True, seed=9)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("rotary", [None, "1d", "1d-partial"], ids=["norot", "rot", "partial"])
def test_one_kernel_backward_varlen_empty_and_single(causal, rotary):
    """deterministic=False on a batch longer than one tile, with empty first / middle / last
    sequences and 1-token ones, GQA 2: every value and gradient against the oracle."""
    check_against_reference([0, 1, 20, 0, 1, 35, 3, 0], 4, 2, 32, torch.float16, causal=causal, rotary=rotary,
                            seed=70, deterministic=False)


class _CountingLaunch:
    """Stands in for a kernel launcher (kernel[grid](...)) and counts its launches."""

    def __init__(self, launcher):
        self.launcher, self.launches = launcher, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.launcher[grid]


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_deterministic_flag_picks_the_backward_kernels(monkeypatch, deterministic):
    """deterministic=False runs the one-kernel backward (never silently the dk / dv + dq pair) on
    sequences longer than one tile; True runs the pair and never the atomic kernel. Batches that fit
    one tile keep the fused-dq path either way (already 5 products, no atomics)."""
    from embedkit._triton import attention as kernels

    counts = {name: _CountingLaunch(getattr(kernels, name))
              for name in ("_dkdv_launch", "_dq_launch", "_fused_bwd_launch")}
    for name, wrapper in counts.items():
        monkeypatch.setattr(kernels, name, wrapper)
    (q, k, v, g), rot = _inputs([9, 30], 4, 2, 32, 31, "1d")
    _run("triton", q, k, v, g, _cu([9, 30]), 30, dtype=torch.float16, rotary=rot, deterministic=deterministic)
    got = {name: w.launches for name, w in counts.items()}
    assert got == ({"_dkdv_launch": 1, "_dq_launch": 1, "_fused_bwd_launch": 0} if deterministic else
                   {"_dkdv_launch": 0, "_dq_launch": 0, "_fused_bwd_launch": 1}), got
    (q, k, v, g), _ = _inputs([9, 12], 4, 2, 32, 32)
    assert kernels.fuse_dq(12)
    _run("triton", q, k, v, g, _cu([9, 12]), 12, dtype=torch.float16, deterministic=deterministic)
    got2 = {name: w.launches - got[name] for name, w in counts.items()}
    assert got2 == {"_dkdv_launch": 1, "_dq_launch": 0, "_fused_bwd_launch": 0}, got2


# ---- isolation, determinism, layouts ----------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_isolation_between_sequences(causal):
    lens = [6, 19, 3, 17]
    (q, k, v, _), rot = _inputs(lens, 4, 2, 32, 12, "1d")
    cu = _cu(lens)
    with embedkit.use_backend("triton"):
        out1 = embedkit.varlen_attention(q, k, v, cu, 19, causal=causal, rotary=rot)
        k2, v2 = k.clone(), v.clone()
        k2[6:25] = torch.randn_like(k2[6:25]) * 10  # sequence 1 only
        v2[6:25] = torch.randn_like(v2[6:25]) * 10
        out2 = embedkit.varlen_attention(q, k2, v2, cu, 19, causal=causal, rotary=rot)
    others = torch.ones(sum(lens), dtype=torch.bool)
    others[6:25] = False
    assert torch.equal(out1[others], out2[others])
    assert not torch.equal(out1[~others], out2[~others])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_backward_is_deterministic(causal):
    lens = [13, 35, 4]
    (q, k, v, g), rot = _inputs(lens, 4, 1, 32, 13, "1d")
    cu = _cu(lens)
    runs = [_run("triton", q, k, v, g, cu, 35, dtype=torch.float16, causal=causal, rotary=rot)[2:]
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    """Strided views (a fused qkv projection's slices; a transposed last dim) give the contiguous result."""
    lens = [9, 22]
    T, H, D = sum(lens), 2, 32
    cu = _cu(lens)
    gen = torch.Generator().manual_seed(14)
    qkv = torch.randn(T, 3, H, D, generator=gen).to(DEVICE)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    g = torch.randn(T, H, D, generator=gen).to(DEVICE)
    strided = _run("triton", q, k, v, g, cu, 22, dtype=torch.float32)
    dense = _run("triton", q.contiguous(), k.contiguous(), v.contiguous(), g, cu, 22, dtype=torch.float32)
    # leaf() copies; build genuinely strided leaves too (last dim not unit-stride).
    qt = q.detach().clone().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert qt.stride(-1) != 1
    with embedkit.use_backend("triton"):
        out_t = embedkit.varlen_attention(qt, k, v, cu, 22)
    (dq_t,) = torch.autograd.grad(out_t, qt, g)
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)
    assert torch.equal(out_t, dense[0])
    assert torch.equal(dq_t, dense[2])
    with embedkit.use_backend("triton"):
        out_s = embedkit.varlen_attention(q, k, v, cu, 22)  # slices of qkv directly, no copy by leaf()
    assert torch.equal(out_s, dense[0])


def test_autotune_prune_sizes_tiles_from_length_bucket():
    """GPU autotuning only considers tiles no larger than the length bucket (short sequences get
    one small tile per sequence) that fit Hopper's shared memory and are not known to spill (the
    static sm_90a report); there is always a config."""
    from embedkit._triton import attention as kernels

    assert [kernels.length_bucket(n) for n in (1, 16, 17, 40, 64, 1000, 100000)] == [16, 16, 32, 64, 64, 1024, 4096]
    for kind, configs, named in (("fwd", kernels._FWD_CONFIGS, {}), ("dq", kernels._DQ_CONFIGS, {"sm_scale": 1.0}),
                                 ("dkdv", kernels._DKDV_CONFIGS, {"FUSED_DQ": False})):
        for bucket in (16, 32, 64, 1024):
            for head_dim in (64, 128, 256):
                for rotary in (False, True):
                    kept = kernels._prune(configs, {"LEN_BUCKET": bucket, **named}, HEAD_DIM=head_dim, ROTARY=rotary,
                                          GROUP=4)
                    assert kept
                    spills = kernels.known_spills(kind, head_dim, rotary, 4)
                    for c in kept:
                        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                        assert bm <= bucket and bn <= bucket
                        if len(kept) > 1 or bucket > 16:
                            smem = kernels.smem_estimate(kind, bm, bn, c.num_stages, head_dim)
                            assert smem <= kernels.SM90_SMEM_LIMIT
                            assert (bm, bn, c.num_warps, c.num_stages) not in spills
    for max_seqlen in range(1, kernels.FUSED_DQ_MAX_SEQLEN + 1):  # the fused-dq backward always has a config
        bucket = kernels.length_bucket(max_seqlen)
        kept = kernels._prune(kernels._DKDV_CONFIGS, {"LEN_BUCKET": bucket}, HEAD_DIM=128, FUSED_DQ=True)
        assert kept and all(c.kwargs["BLOCK_M"] <= c.kwargs["BLOCK_N"] == bucket >= max_seqlen for c in kept)


# ---- bad inputs -------------------------------------------------------------------------------

def _good(T=10, Hq=4, Hkv=2, D=16):
    q = torch.randn(T, Hq, D)
    k = torch.randn(T, Hkv, D)
    v = torch.randn(T, Hkv, D)
    return q, k, v, _cu([4, 6], "cpu")


def _bad_cases():
    q, k, v, cu = _good()
    cos, sin = embedkit.rotary_tables(torch.arange(10), 16)
    return [
        ("q 2-D", dict(q=q[:, 0]), ValueError, "q must be 3-D"),
        ("q int", dict(q=q.long()), TypeError, "q must have dtype"),
        ("k dtype", dict(k=k.half()), TypeError, "k has dtype"),
        ("v dtype", dict(v=v.double()), TypeError, "v has dtype"),
        ("k tokens", dict(k=k[:9], v=v[:9]), ValueError, "k must have T = 10"),
        ("k head dim", dict(k=torch.randn(10, 2, 24), v=torch.randn(10, 2, 24)), ValueError, "head dim"),
        ("v shape", dict(v=v[:, :1]), ValueError, "v must have the shape of k"),
        ("Hq % Hkv", dict(k=torch.randn(10, 3, 16), v=torch.randn(10, 3, 16)), ValueError, "multiple"),
        # D not a multiple of 8 (59, 111, 12) is supported (tests/test_attention_kernels.py); D = 0 is not.
        ("D zero", dict(q=torch.randn(10, 4, 0), k=torch.randn(10, 2, 0), v=torch.randn(10, 2, 0)),
         ValueError, "between 1 and 256"),
        ("D > 256", dict(q=torch.randn(2, 4, 264), k=torch.randn(2, 2, 264), v=torch.randn(2, 2, 264),
                         cu_seqlens=_cu([2], "cpu")), ValueError, "up to 256|between 8 and 256"),
        ("k device", dict(k=k.to("meta"), v=v.to("meta")), ValueError, "mixed devices"),
        ("cu dtype", dict(cu_seqlens=cu.long()), TypeError, "cu_seqlens must have dtype"),
        ("cu last", dict(cu_seqlens=_cu([4, 5], "cpu")), ValueError, r"cu_seqlens\[-1\]"),
        ("cu first", dict(cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, r"cu_seqlens\[0\]"),
        ("cu decreasing", dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError,
         "non-decreasing"),
        ("cu 2-D", dict(cu_seqlens=cu[None]), ValueError, "cu_seqlens must be 1-D"),
        ("max_seqlen low", dict(max_seqlen=5), ValueError, "below the longest"),
        ("max_seqlen float", dict(max_seqlen=6.0), TypeError, "max_seqlen must be a Python int"),
        ("scale negative", dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
        ("scale str", dict(softmax_scale="0.1"), TypeError, "softmax_scale"),
        ("causal str", dict(causal="yes"), TypeError, "causal"),
        ("rotary not pair", dict(rotary=cos), TypeError, "rotary"),
        ("rotary rows", dict(rotary=(cos[:9], sin[:9])), ValueError, "T = 10 rows"),
        ("rotary too wide", dict(rotary=embedkit.rotary_tables(torch.arange(10), 32)), ValueError, "R <= D"),
        ("rotary shapes differ", dict(rotary=(cos, sin[:, :4])), ValueError, "same shape"),
        ("rotary 1-D", dict(rotary=(cos[:, 0], sin[:, 0])), ValueError, "rotary cos must be 2-D"),
        ("rotary int", dict(rotary=(cos.long(), sin.long())), TypeError, "rotary cos must have dtype"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, override, exc, match = case
    q, k, v, cu = _good()
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=6)
    args.update(override)
    with embedkit.use_backend("triton"), pytest.raises(exc, match=match):
        embedkit.varlen_attention(**args)


def test_float64_needs_reference_backend():
    q, k, v, cu = _good()
    with embedkit.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        embedkit.varlen_attention(q.double(), k.double(), v.double(), cu, 6)
    with embedkit.use_backend("reference"):
        assert embedkit.varlen_attention(q.double(), k.double(), v.double(), cu, 6).dtype == torch.float64


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rotary_dim=7), ValueError, "even"),
    (dict(rotary_dim=1.5), TypeError, "rotary_dim"),
    (dict(position_ids=torch.zeros(3, 4, dtype=torch.long), sections=None), ValueError, "sections"),
    (dict(position_ids=torch.zeros(3, 4, dtype=torch.long), sections=(1, 1, 1)), ValueError, "sections"),
    (dict(position_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"\[T\] or \[3, T\]"),
    (dict(position_ids=torch.zeros(4)), TypeError, "position_ids"),
    (dict(theta=0.0), ValueError, "theta"),
])
def test_rotary_tables_bad_inputs(kwargs, exc, match):
    args = dict(position_ids=torch.arange(4), rotary_dim=8)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        embedkit.rotary_tables(**args)


def test_rotary_tables_values():
    pos = torch.tensor([0, 1, 5])
    cos, sin = embedkit.rotary_tables(pos, 8, theta=100.0)
    inv = 100.0 ** (-torch.arange(4, dtype=torch.float64) * 2 / 8)
    torch.testing.assert_close(cos, (pos[:, None] * inv).cos().float())
    pos3 = torch.stack([pos, pos + 1, pos + 2])
    cos3, sin3 = embedkit.rotary_tables(pos3, 8, theta=100.0, sections=(2, 1, 1))
    ang = torch.stack([pos3[0] * inv[0], pos3[0] * inv[1], pos3[1] * inv[2], pos3[2] * inv[3]], dim=1)
    torch.testing.assert_close(sin3, ang.sin().float())


# ---- torch.compile and the flash-attn drop-in -------------------------------------------------

def test_torch_compile_fullgraph():
    lens = [5, 19]
    (q, k, v, g), rot = _inputs(lens, 4, 2, 32, 15, "1d")
    cu = _cu(lens)

    def loss_fn(q, k, v, cu, cos, sin):
        out = embedkit.varlen_attention(q, k, v, cu, 19, causal=True, rotary=(cos, sin))
        return (out.float() * g).sum()

    torch._dynamo.reset()
    with embedkit.use_backend("triton"):
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (compiled, loss_fn):
            qq, kk, vv = leaf(q), leaf(k), leaf(v)
            loss = fn(qq, kk, vv, cu, *rot)
            results.append((loss, *torch.autograd.grad(loss, (qq, kk, vv))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementation and autograd registration of both custom ops."""
    from embedkit.ops import attention as ops

    lens = [3, 17]
    (q, k, v, g), (cos, sin) = _inputs(lens, 2, 1, 16, 1, "1d")
    cu = _cu(lens)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(ops._fwd, (q, k, v, cu, 17, False, 0.25, cos, sin, "triton"))
    out, lse = ops._fwd(q, k, v, cu, 17, False, 0.25, cos, sin, "triton")
    detached = [x.detach() for x in (q, k, v, out, lse)]
    torch.library.opcheck(ops._bwd, (g, None, *detached, cu, 17, False, 0.25, cos, sin, "triton"))
    # the flag's non-default value through both schemas (the forward ignores it)
    torch.library.opcheck(ops._fwd, (q, k, v, cu, 17, False, 0.25, cos, sin, "triton", False))
    torch.library.opcheck(ops._bwd, (g, None, *detached, cu, 17, False, 0.25, cos, sin, "triton", False))


def test_flash_attn_drop_in():
    lens = [7, 20]
    (q, k, v, g), _ = _inputs(lens, 4, 1, 32, 16)
    cu = _cu(lens)
    with embedkit.use_backend("triton"):
        out = embedkit.flash_attn_varlen_func(q, k, v, cu, cu.clone(), 20, 20, softmax_scale=0.2, causal=True,
                                              deterministic=True)
        ref, lse = embedkit.varlen_attention(q, k, v, cu, 20, softmax_scale=0.2, causal=True, return_lse=True)
        out3, lse3, probs = embedkit.flash_attn_varlen_func(q, k, v, cu, cu, 20, 20, softmax_scale=0.2,
                                                            causal=True, return_attn_probs=True)
    assert torch.equal(out, ref) and torch.equal(out3, ref) and torch.equal(lse3, lse)
    assert isinstance(probs, torch.Tensor) and probs.numel() == 0  # flash-attn 2's empty S_dmask


@pytest.mark.parametrize("kwargs,match", [
    (dict(dropout_p=0.1), "dropout_p"),
    (dict(window_size=(8, 8)), "window_size"),
    (dict(softcap=30.0), "softcap"),
    (dict(alibi_slopes=torch.ones(4)), "alibi"),
    (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), "block_table"),
    (dict(cu_seqlens_k=_cu([10, 17], "cpu")), "cross-attention"),
    (dict(cu_seqlens_k=_cu([5, 1, 21], "cpu")), "cross-attention"),
    (dict(max_seqlen_k=64), "cross-attention"),
])
@pytest.mark.parametrize("validation", [True, False], ids=["validated", "validation-off"])
def test_flash_attn_unsupported_options(kwargs, match, validation):
    embedkit.set_validation(validation)  # unsupported options raise either way: never a wrong answer
    lens = [7, 20]
    (q, k, v, _), _ = _inputs(lens, 4, 1, 32, 17, device="cpu")
    cu = _cu(lens, "cpu")
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=20, max_seqlen_k=20)
    args.update(kwargs)
    with pytest.raises(NotImplementedError, match=match):
        embedkit.flash_attn_varlen_func(**args)


# ---- GPU: bf16 at larger shapes ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("Hq,Hkv,D,rotary", [(16, 16, 64, None), (16, 4, 128, "1d"), (8, 1, 80, "3axis"),
                                             (4, 2, 256, "1d-partial")])
def test_gpu_bf16_large(Hq, Hkv, D, rotary, causal):
    gen = torch.Generator().manual_seed(D + Hq)
    lens = torch.randint(1, 700, (12,), generator=gen).tolist() + [1, 63, 64, 65, 127, 128, 129, 1500]
    check_against_reference(lens, Hq, Hkv, D, torch.bfloat16, causal=causal, rotary=rotary, seed=D,
                            device=torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_many_short_sequences_bf16():
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(16, 65, (2048,), generator=gen).tolist()
    check_against_reference(lens, 16, 4, 128, torch.bfloat16, rotary="1d", seed=1, device=torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_deterministic_bf16():
    lens = [300, 1200, 45]
    (q, k, v, g), rot = _inputs(lens, 16, 4, 128, 2, "1d", device=torch.device("cuda"))
    cu = _cu(lens, torch.device("cuda"))
    runs = [_run("triton", q, k, v, g, cu, 1200, dtype=torch.bfloat16, rotary=rot)[2:] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)



def test_strided_cu_seqlens_is_read_as_its_values():
    """A strided view of cu_seqlens (every other entry of a larger tensor) gives the contiguous result."""
    lens = [5, 1, 12, 7]
    (q, k, v, g), _ = _inputs(lens, 2, 1, 16, seed=3)
    cu = _cu(lens)
    cu_strided = torch.stack([cu, torch.full_like(cu, 10 ** 6)], dim=1).flatten()[0::2]
    assert not cu_strided.is_contiguous()
    want = _run("triton", q, k, v, g, cu, 12, dtype=torch.float32)
    got = _run("triton", q, k, v, g, cu_strided, 12, dtype=torch.float32)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
