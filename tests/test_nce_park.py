"""The two register-saving paths of the multi-level NCE score kernels: the coefficient kernel's PARK (each
level's coefficient tile parked, bit-exact, in the E block's own memory until the last level: gradients
bit-identical to the running sums in registers, nce.PARK = False) and the split forward's positives taken
after the candidate loop (_nce_fwd_positives: a row whose only candidate is its positive keeps loss and
gradient exactly 0 at any temperature)."""
import inspect

import pytest
import torch

import embedkit
from test_nce import KERNEL_BACKENDS

pytestmark = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no triton backend")


@pytest.fixture
def kernels():
    from embedkit._triton import nce

    return nce


def _grads(dtype, dims, symmetric, K, seed=3, B=37, D=None, temp=0.05):
    D = D or dims[-1]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g).to(dtype)
    t = torch.randn(B, D, generator=g).to(dtype)
    neg = torch.randn(B, K, D, generator=g).to(dtype) if K else None
    ids = torch.randint(0, B // 2, (B,), generator=g)
    xs = [q.requires_grad_(), t.requires_grad_()] + ([neg.requires_grad_()] if K else [])
    tt = torch.tensor(temp, requires_grad=True)
    with embedkit.use_backend("triton"):
        loss = embedkit.nce_loss(q, t, negatives=neg, temperature=tt, query_ids=ids, symmetric=symmetric,
                                 mrl_dims=dims, reduction="sum")
    return [loss.detach()] + list(torch.autograd.grad(loss, xs + [tt]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dims", [[16, 40], [16, 40, 72]], ids=["L2", "L3"])
def test_park_is_bit_identical_to_registers(kernels, monkeypatch, dtype, dims):
    monkeypatch.setattr(kernels, "PARK", True)
    parked = _grads(dtype, dims, symmetric=True, K=1)
    monkeypatch.setattr(kernels, "PARK", False)
    held = _grads(dtype, dims, symmetric=True, K=1)
    for a, b in zip(parked, held):
        assert torch.equal(a, b)
    assert all(torch.isfinite(a).all() for a in parked)


def test_park_is_taken_and_sizes_the_scratch_slot(kernels, monkeypatch):
    seen = []
    real = kernels._launch

    def spy(kernel, grid, *args, _D, **kw):
        fn = kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        if fn.__name__ == "_nce_bwd_coef_kernel":
            e = args[list(inspect.signature(fn).parameters).index("e_buf")]
            seen.append((kw["NUM_LEVELS"], kw["PARK"], e.shape[0], e.dtype))
        return real(kernel, grid, *args, _D=_D, **kw)
    monkeypatch.setattr(kernels, "_launch", spy)
    _grads(torch.bfloat16, [16, 40, 72], symmetric=False, K=0)  # the default: no PARK
    assert seen == [(3, False, 3, torch.bfloat16)] * len(seen) and seen
    seen.clear()
    monkeypatch.setattr(kernels, "PARK", True)
    _grads(torch.bfloat16, [16, 40, 72], symmetric=False, K=0)
    _grads(torch.float16, [16, 40, 72], symmetric=False, K=0)
    _grads(torch.bfloat16, [16, 40], symmetric=False, K=0)
    _grads(torch.bfloat16, [40], symmetric=False, K=0)
    assert (3, True, 4, torch.bfloat16) in seen      # 16-bit E: two slots per parked tile, one scratch
    assert (3, True, 3, torch.float32) in seen       # fp16 inputs: fp32 E, one slot per parked tile
    assert (2, True, 2, torch.bfloat16) in seen
    assert (1, False, 1, torch.bfloat16) in seen


@pytest.mark.parametrize("tau", [1.0, 1e-2, 1e-4])
def test_split_forward_row_with_only_its_positive_has_zero_loss(kernels, monkeypatch, tau):
    """The split 3-level forward (TMA, two half-wide accumulators) with its positives recomputed after the
    loop: the positive's logit is the very one the online max saw, so loss and gradients are exactly 0.
    Interpreter tiles 16 x 32 (rows 16-31 have their positives in the tile's second half), two candidate
    splits."""
    monkeypatch.setattr(kernels, "_interp_blocks", lambda D: dict(BLOCK_M=16, BLOCK_N=32,
                                                                  BLOCK_D=kernels._block_d(D)))
    monkeypatch.setattr(kernels, "SPLIT_FROM", 32)
    monkeypatch.setattr(kernels, "FWD_SPLIT", 2)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(40, 64, generator=g).to(torch.bfloat16).requires_grad_()
    t = torch.randn(40, 64, generator=g).to(torch.bfloat16).requires_grad_()
    ids = torch.full((40,), 4, dtype=torch.int64)
    temp = torch.tensor(tau, requires_grad=True)
    with embedkit.use_backend("triton"):
        loss = embedkit.nce_loss(q, t, temperature=temp, query_ids=ids, symmetric=True, reduction="none",
                                 mrl_dims=[16, 32, 64])
    assert torch.equal(loss.float(), torch.zeros_like(loss.float()))
    for gr in torch.autograd.grad(loss.sum(), [q, t, temp]):
        assert torch.isfinite(gr).all()
        assert gr.abs().max() == 0


def test_forward_prune_keeps_the_split_128_tile_per_version(kernels):
    """3 levels on TMA: the split 128 x 128 forward where its loops compile spill-free (Triton 3.6 at 3 / 4
    stages, 3.9 at 3), else 128 x 64 at most; never with the candidate mask."""
    args = dict(NUM_LEVELS=3, ALIGNED=True, USE_TMA=True, HAS_CAND_MASK=False, DOT_DTYPE=None)

    def big(version, **kw):
        kept = kernels._prune_fwd(kernels._FWD_CONFIGS, dict(args, **kw), version=version)
        return sorted(c.num_stages for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (128, 128))
    assert big("3.6") == [3, 4]
    assert big("3.9") == [3]
    assert big("3.5") == []
    assert big("3.9", USE_TMA=False) == []
    assert big("3.6", HAS_CAND_MASK=True) == []
