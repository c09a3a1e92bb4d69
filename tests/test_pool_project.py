"""pool_project: every backend against the reference (values and every gradient), bad inputs, compile."""
import pytest
import torch
from hypothesis import given, strategies as st

import embedkit
from embedkit.ops import reference
from numerics import TRITON_DTYPES, assert_bf16_interpreted, assert_by_rule, grads, leaf

from conftest import DEVICE


def _cu(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu.to(DEVICE)


def _case(lengths, H, d_out, *, seed=0, mask_prefix=None, random_mask=False):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(d_out, H, generator=g, dtype=torch.float64) * H ** -0.5
    bias = torch.randn(d_out, generator=g, dtype=torch.float64) * 0.1
    pool_mask = None
    if mask_prefix is not None or random_mask:
        pool_mask = torch.ones(T, dtype=torch.bool)
        start = 0
        for n in lengths:
            if mask_prefix:  # exclude an instruction prefix, keep at least one token
                pool_mask[start:start + min(mask_prefix, n - 1)] = False
            if random_mask and n > 1:
                drop = torch.rand(n, generator=g) < 0.4
                drop[int(torch.randint(n, (1,), generator=g))] = False
                pool_mask[start:start + n] &= ~drop
            start += n
        pool_mask = pool_mask.to(DEVICE)
    return _cu(lengths), hidden.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), pool_mask


def _check_backend(backend, dtype, lengths, H, d_out, out_dim, normalize, use_bias, pool_mask_kind, seed=0):
    cu, hidden, weight, bias, pool_mask = _case(
        lengths, H, d_out, seed=seed, mask_prefix=2 if pool_mask_kind == "prefix" else None,
        random_mask=pool_mask_kind == "random")
    bias = bias if use_bias else None
    kw = dict(pool_mask=pool_mask, out_dim=out_dim, normalize=normalize)
    B = len(lengths)
    g_out = torch.randn(B, out_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)

    def run(dt, backend_name):
        xs = [leaf(hidden, dt), leaf(weight, dt), None if bias is None else leaf(bias, dt)]
        with embedkit.use_backend(backend_name):
            out = embedkit.pool_project(xs[0], cu, xs[1], xs[2], **kw)
        assert out.dtype == dt and out.shape == (B, out_dim)
        return out, grads(out, xs, g_out)

    oracle, oracle_g = run(torch.float64, "reference")
    lowp, lowp_g = run(dtype, "reference")
    actual, actual_g = run(dtype, backend)
    slack = 1e-5 if dtype == torch.float32 else 1e-3
    assert_by_rule("out", actual, oracle, lowp, atol=slack)
    for name, a, o, lo in zip(("d_hidden", "d_weight", "d_bias"), actual_g, oracle_g, lowp_g):
        assert_by_rule(name, a, o, lo, factor=3.0, atol=slack)


KERNEL_BACKENDS = [b for b in ("triton", "native") if b in embedkit.available_backends("pool_project")]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_reference_fixed_shapes(backend, dtype, normalize):
    # length 1, a length not a multiple of the token block (32), one above it; mask excluding a prefix.
    _check_backend(backend, dtype, [1, 45, 33, 7], H=40, d_out=48, out_dim=24, normalize=normalize,
                   use_bias=True, pool_mask_kind="prefix")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bfloat16_on_cpu_within_truncation_bound(backend):
    """bf16 pointers, loads and casts on CPU (the tolerance rule for bf16 runs on GPU, see numerics)."""
    cu, hidden, weight, bias, pool_mask = _case([1, 45, 33], 40, 48, mask_prefix=2)
    xs = [leaf(x, torch.bfloat16) for x in (hidden, weight, bias)]
    with embedkit.use_backend(backend):
        out = embedkit.pool_project(xs[0], cu, xs[1], xs[2], pool_mask=pool_mask, out_dim=24, normalize=True)
    # grad_out holds bf16 values for both sides, so only the kernel's own rounding differs.
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).double()
    got = grads(out, xs, g)
    ref_in = [leaf(x, torch.float64) for x in xs]  # the same bf16 values, widened: isolates the kernel's own error
    ref = reference.pool_project(ref_in[0], cu, ref_in[1], ref_in[2], pool_mask=pool_mask, out_dim=24, normalize=True)
    ref_g = grads(ref, ref_in, g)
    assert_bf16_interpreted("out", out, ref, atol=1e-4)
    for name, a, r in zip(("d_hidden", "d_weight", "d_bias"), got, ref_g):
        assert_bf16_interpreted(name, a, r, atol=1e-4 * r.abs().max().item())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_many_short_and_one_long(backend):
    _check_backend(backend, torch.float32, [1, 2, 3, 1, 2, 1, 150, 4, 1], H=24, d_out=32, out_dim=32,
                   normalize=True, use_bias=False, pool_mask_kind="random")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=12),
    H=st.integers(1, 80),
    d_out=st.integers(1, 72),
    out_frac=st.floats(0.05, 1.0),
    dtype=st.sampled_from(TRITON_DTYPES),
    normalize=st.booleans(),
    use_bias=st.booleans(),
    pool_mask_kind=st.sampled_from([None, "prefix", "random"]),
    seed=st.integers(0, 2 ** 16),
)
def test_matches_reference_hypothesis(backend, lengths, H, d_out, out_frac, dtype, normalize, use_bias,
                                      pool_mask_kind, seed):
    out_dim = max(1, int(round(d_out * out_frac)))
    _check_backend(backend, dtype, lengths, H, d_out, out_dim, normalize, use_bias, pool_mask_kind, seed)


def test_reference_gradcheck_float64():
    cu, hidden, weight, bias, pool_mask = _case([3, 1, 5], 6, 7, mask_prefix=1)
    hidden, weight, bias = (leaf(x) for x in (hidden, weight, bias))
    for normalize in (False, True):
        assert torch.autograd.gradcheck(
            lambda h, w, b: reference.pool_project(h, cu, w, b, pool_mask=pool_mask, out_dim=5, normalize=normalize),
            (hidden, weight, bias))


def test_reference_definition_by_hand():
    # Two sequences; the second pools only its last two tokens.
    hidden = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [2.0, 2.0], [4.0, 6.0]], dtype=torch.float64)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    mask = torch.tensor([True, True, False, True, True])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    bias = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    out = embedkit.pool_project(hidden, cu, weight, bias, pool_mask=mask, out_dim=2)
    assert torch.equal(out, torch.tensor([[2.5, 3.0], [3.5, 4.0]], dtype=torch.float64))
    normed = embedkit.pool_project(hidden, cu, weight, pool_mask=mask, out_dim=2, normalize=True)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_hidden_is_read_correctly(backend):
    wide = torch.randn(20, 64, device=DEVICE)
    hidden = wide[:, 8:40]  # row stride 64, not H
    cu = _cu([5, 15])
    weight = torch.randn(16, 32, device=DEVICE)
    with embedkit.use_backend(backend):
        out = embedkit.pool_project(hidden, cu, weight)
    ref = reference.pool_project(hidden.double(), cu, weight.double())
    assert (out.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    cu, hidden, weight, bias, pool_mask = _case([4, 9, 2], 16, 24, mask_prefix=1)
    hidden, weight, bias = (leaf(x, torch.float32) for x in (hidden, weight, bias))

    def f(h, w, b):
        return embedkit.pool_project(h, cu, w, b, pool_mask=pool_mask, out_dim=12, normalize=True).sum()

    with embedkit.use_backend(backend):
        eager = f(hidden, weight, bias)
        eager_g = torch.autograd.grad(eager, (hidden, weight, bias))
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(hidden, weight, bias)
        got_g = torch.autograd.grad(got, (hidden, weight, bias))
    assert torch.allclose(got, eager, atol=1e-6)
    for a, b in zip(got_g, eager_g):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_backward_keeps_no_hidden_sized_tensor(backend, normalize):
    """Only what the backward reads is saved: hidden's shape and dtype, never a [T, H] tensor."""
    cu, hidden, weight, bias, _ = _case([5, 9, 2], 16, 24)
    h, w, b = (leaf(x, torch.float32) for x in (hidden, weight, bias))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with embedkit.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = embedkit.pool_project(h, cu, w, b, out_dim=12, normalize=normalize)
    assert saved and tuple(h.shape) not in saved, saved
    (g,) = torch.autograd.grad(out.sum(), h)
    assert g.shape == h.shape


def test_fake_implementation_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden = torch.empty(10, 8, dtype=torch.bfloat16)
        cu = torch.empty(4, dtype=torch.int32)
        weight = torch.empty(12, 8, dtype=torch.bfloat16)
        out = torch.ops.embedkit.pool_project_fwd(hidden, cu, weight, None, None, 6, True, "triton")
        assert out[0].shape == (3, 6) and out[0].dtype == torch.bfloat16
        assert out[1].shape == (3, 8) and out[1].dtype == torch.float32


# ---- bad inputs -------------------------------------------------------------------------------------

def _good():
    return dict(hidden=torch.randn(6, 4), cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32),
                weight=torch.randn(5, 4), bias=torch.randn(5))


@pytest.mark.parametrize("change, error, match", [
    (dict(hidden=torch.randn(6, 3)), ValueError, r"weight must have shape \[D_out, H\] with H = 3"),
    (dict(hidden=torch.randint(0, 5, (6, 4))), TypeError, "hidden must have dtype"),
    (dict(hidden=torch.randn(6)), ValueError, "hidden must be 2-D"),
    (dict(hidden=torch.randn(6, 0), weight=torch.randn(5, 0)), ValueError, r"at least one column \(H >= 1\)"),
    (dict(weight=torch.randn(5, 4, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have D_out = 5"),
    (dict(out_dim=6), ValueError, "out_dim must be <= 5"),
    (dict(out_dim=0), ValueError, "out_dim must be >= 1"),
    (dict(out_dim=2.0), TypeError, "out_dim must be a Python int"),
    (dict(cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int64)), TypeError, "cu_seqlens must have dtype"),
    (dict(cu_seqlens=torch.tensor([1, 2, 6], dtype=torch.int32)), ValueError, r"cu_seqlens\[0\] must be 0"),
    (dict(cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, r"cu_seqlens\[-1\] must equal .* T = 6"),
    (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError, "at least 2 entries"),
    (dict(cu_seqlens=torch.tensor([0, 0, 6], dtype=torch.int32)), ValueError, "sequence 0 is empty"),
    (dict(pool_mask=torch.tensor([True, True, False, False, False, False])), ValueError,
     "sequence 1 has no token with pool_mask True"),
    (dict(pool_mask=torch.ones(6, dtype=torch.int32)), TypeError, "pool_mask must have dtype"),
    (dict(pool_mask=torch.ones(5, dtype=torch.bool)), ValueError, "pool_mask must have T = 6"),
    (dict(cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32, device="meta")), ValueError, "mixed devices"),
    (dict(weight=torch.randn(5, 4, device="meta")), ValueError, "mixed devices"),
    (dict(normalize="no"), TypeError, "normalize must be a bool"),  # a truthy string normalized before
    (dict(normalize=1), TypeError, "normalize must be a bool"),
    (dict(cu_seqlens=torch.tensor([0, 2 ** 31 - 1, -2 ** 31, 6], dtype=torch.int32)), ValueError,
     "non-decreasing"),  # int32 steps wrap to non-negative ones: checked in int64
])
@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_bad_inputs_raise_clear_errors(change, error, match, backend):
    args = {**_good(), **change}
    kw = {k: args.pop(k) for k in ("pool_mask", "out_dim", "normalize") if k in args}
    with embedkit.use_backend(backend), pytest.raises(error, match=match):
        embedkit.pool_project(args["hidden"], args["cu_seqlens"], args["weight"], args["bias"], **kw)


def test_float64_on_kernel_backend_is_an_error_not_a_fallback():
    if "triton" not in KERNEL_BACKENDS:
        pytest.skip("no triton backend")
    a = _good()
    with embedkit.use_backend("triton"), pytest.raises(TypeError, match="got float64"):
        embedkit.pool_project(a["hidden"].double(), a["cu_seqlens"], a["weight"].double())


def test_validation_off_skips_sync_checks_only():
    a = _good()
    embedkit.set_validation(False)
    # Content checks (cu_seqlens values) are skipped; free checks (shapes, dtypes) still run.
    embedkit.pool_project(a["hidden"], a["cu_seqlens"], a["weight"])
    with pytest.raises(ValueError, match="weight must have shape"):
        embedkit.pool_project(a["hidden"], a["cu_seqlens"], torch.randn(5, 3))


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no triton backend")
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_triton_token_splits_match_reference(splits):
    """Sequences cut into chunks (the GPU path for few long sequences), reduced deterministically."""
    from embedkit._triton import pool_project as kernels

    cu, hidden, weight, bias, pool_mask = _case([1, 40, 9, 2], 24, 16, random_mask=True)
    h32, w32, b32 = hidden.float(), weight.float(), bias.float()
    out, pooled, counts, y, inv = kernels.pool_project_fwd(h32, cu, w32, b32, pool_mask, 12, True, splits=splits)
    ref = reference.pool_project(hidden, cu, weight, bias, pool_mask=pool_mask, out_dim=12, normalize=True)
    assert (out.double() - ref).abs().max() < 1e-5
    assert torch.equal(counts, torch.tensor([1.0, float(pool_mask[1:41].sum()), float(pool_mask[41:50].sum()),
                                             float(pool_mask[50:].sum())]))
    g = torch.randn(4, 12, dtype=torch.float64)
    d_h, d_w, d_b = kernels.pool_project_bwd(g.float(), pooled, counts, y, inv, tuple(h32.shape), torch.float32,
                                             cu, w32, True, pool_mask, True, splits=splits)
    xs = [leaf(x) for x in (hidden, weight, bias)]
    ref_g = grads(reference.pool_project(xs[0], cu, xs[1], xs[2], pool_mask=pool_mask, out_dim=12, normalize=True),
                  xs, g)
    for a, r in zip((d_h, d_w, d_b), ref_g):
        assert (a.double() - r).abs().max() < 1e-5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_cu_seqlens_and_pool_mask(backend):
    """Views with a stride (e.g. every other entry of a larger tensor) are read as the values they show."""
    cu, hidden, weight, bias, pool_mask = _case([3, 7, 5], 16, 8, random_mask=True)
    cu_strided = torch.stack([cu, torch.full_like(cu, 999)], dim=1).flatten()[0::2]
    mask_strided = torch.stack([pool_mask, ~pool_mask], dim=1).flatten()[0::2]
    assert not cu_strided.is_contiguous() and not mask_strided.is_contiguous()
    h = leaf(hidden, torch.float32)
    with embedkit.use_backend(backend):
        got = embedkit.pool_project(h, cu_strided, weight.float(), bias.float(), pool_mask=mask_strided)
    ref = reference.pool_project(hidden, cu, weight, bias, pool_mask=pool_mask)
    assert (got.double() - ref).abs().max() < 1e-5
    g = torch.autograd.grad(got.sum(), h)[0]
    h64 = leaf(hidden)
    ref_g = torch.autograd.grad(reference.pool_project(h64, cu, weight, bias, pool_mask=pool_mask).sum(), h64)[0]
    assert (g.double() - ref_g).abs().max() < 1e-5
