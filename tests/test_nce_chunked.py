"""The GEMM-shaped Triton backward and the split forward of nce_loss at chunk sizes far below B: several
row chunks x candidate chunks x MRL segments (and level groups), forward splits of the candidate axis,
against the float64 dense oracle by the tolerance rule; determinism; and the backward's temporaries
bounded by the chunk, not by B."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import embedkit
from conftest import DEVICE
from test_nce import KERNEL_BACKENDS, check

pytestmark = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no triton backend")


@pytest.fixture
def small_chunks(monkeypatch):
    from embedkit._triton import nce as kernels

    monkeypatch.setattr(kernels, "ROW_CHUNK", 7)
    monkeypatch.setattr(kernels, "CAND_CHUNK", 11)
    monkeypatch.setattr(kernels, "FWD_SPLIT", 3)
    monkeypatch.setattr(kernels, "GEMM_COLS", 5)  # the gradient GEMMs in column pieces within a segment
    return kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_chunked_levels_own_negatives_ids_learnable_temperature(small_chunks, dtype):
    # 37 rows: 6 row chunks x 4 candidate chunks (the last ones ragged), 3 unaligned levels.
    check("triton", dtype, 37, 40, 2, ids="dups", tensor_temp=True, mrl_dims=[8, 21, 40],
          mrl_weights=[1.0, 0.5, 2.0], temperature=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_aligned_levels(small_chunks, dtype):
    """Level widths multiples of 64 take the kernels' unpredicated D loop (ALIGNED), the path of the GPU's
    3-level 128 x 64 tiles: values and every gradient against the oracle, own negatives, duplicate ids."""
    assert small_chunks._aligned((64, 128, 192)) and not small_chunks._aligned((8, 21, 40))
    check("triton", dtype, 13, 192, 1, ids="dups", tensor_temp=True, mrl_dims=[64, 128, 192],
          mrl_weights=[1.0, 0.5, 2.0], temperature=0.05)


def test_chunked_aligned_one_label_gradient_is_exactly_zero(small_chunks):
    """Every candidate but the positive masked: loss and every gradient exactly 0 on the aligned path too."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(11, 128, generator=g).to(DEVICE).requires_grad_()
    t = torch.randn(11, 128, generator=g).to(DEVICE).requires_grad_()
    temp = torch.tensor(1e-3, device=DEVICE, requires_grad=True)
    ids = torch.zeros(11, dtype=torch.int64, device=DEVICE)
    with embedkit.use_backend("triton"):
        loss = embedkit.nce_loss(q, t, temperature=temp, query_ids=ids, target_ids=ids, symmetric=True,
                                 mrl_dims=[64, 128])
    grads = torch.autograd.grad(loss, [q, t, temp])
    assert loss.item() == 0.0
    for gr in grads:
        assert torch.count_nonzero(gr).item() == 0


def test_coefficient_block_too_large_for_int32_offsets_is_rejected():
    from embedkit._triton import nce as K

    rows = torch.empty(30000, 1)
    with pytest.raises(ValueError, match="row_chunk \\* cand_chunk"):
        K.nce_bwd(None, rows, rows, None, None, None, None, None, None, 0, None, (1,), None, None, None, None,
                  None, None, None, row_chunk=30000, cand_chunk=30000)


def test_chunked_symmetric_shared_negatives_four_levels(small_chunks):
    # Shared negatives (3 x 23 = 69 more candidates, their own chunks and accumulator), both directions,
    # 4 levels = two level groups whose segments both start at 0.
    check("triton", torch.float32, 23, 32, 3, ids="dups", tensor_temp=True, symmetric=True, shared=True,
          mrl_dims=[4, 12, 20, 32], reduction="sum")


def test_chunked_one_label_masks_everything_but_the_positive(small_chunks):
    check("triton", torch.float32, 19, 16, 0, ids="one_label", tensor_temp=True, symmetric=True, mrl_dims=[8, 16])


def test_chunk_sizes_as_launcher_arguments_give_the_same_gradients():
    """Every row chunk adds to every candidate's gradient: the accumulation across chunks (fp32, and the
    bf16 hi + lo pair) matches one big block to rounding, and is bitwise deterministic run to run."""
    from embedkit._triton import nce as K

    g = torch.Generator().manual_seed(5)
    M, D, dims = 29, 24, (8, 24)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q = torch.randn(M, D, generator=g).to(DEVICE, dtype)
        t = torch.randn(M, D, generator=g).to(DEVICE, dtype)
        it = torch.tensor([1 / 0.1], device=DEVICE)
        lse, pos, es, ir, ic, is_, in_, rc = K.nce_fwd(q, t, None, None, None, None, None, None, 0, it, dims)
        up = torch.randn(len(dims), M, generator=g).to(DEVICE)
        args = (up, q, t, None, None, None, None, None, None, 0, it, dims, lse, pos, ir, ic, is_, in_, rc)
        big = K.nce_bwd(*args, row_chunk=64, cand_chunk=64)
        small = K.nce_bwd(*args, row_chunk=4, cand_chunk=5)
        again = K.nce_bwd(*args, row_chunk=4, cand_chunk=5)
        for a, b, c in zip(big[:2], small[:2], again[:2]):
            assert torch.equal(b, c)  # deterministic
            scale = a.float().abs().max().item()
            assert (a.float() - b.float()).abs().max().item() <= tol * scale
    with pytest.raises(ValueError, match="row_chunk"):
        K.nce_bwd(*args, row_chunk=-1)


class _Biggest(TorchDispatchMode):
    """Records the shape of every tensor an out-of-place op returns (in-place ops -- copy_, set_, the
    interpreter's storage shuttling -- allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0].endswith("_"):
            return out
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
        return out


def _bwd_temporaries(K, B, D, row_chunk, cand_chunk):
    g = torch.Generator().manual_seed(2)
    dims = (4, D)
    q = torch.randn(B, D, generator=g).to(DEVICE, torch.bfloat16)
    t = torch.randn(B, D, generator=g).to(DEVICE, torch.bfloat16)
    neg = torch.randn(B, 1, D, generator=g).to(DEVICE, torch.bfloat16)
    ids = torch.arange(B, device=DEVICE) // 2
    it = torch.tensor([20.0], device=DEVICE)
    res = K.nce_fwd(q, t, None, neg, ids, None, ids, None, 0, it, dims)
    lse, pos, es, ir, ic, is_, in_, rc = res
    up = torch.ones(len(dims), B, device=DEVICE)
    with _Biggest() as rec:
        K.nce_bwd(up, q, t, None, neg, ids, None, ids, None, 0, it, dims, lse, pos, ir, ic, is_, in_, rc,
                  row_chunk=row_chunk, cand_chunk=cand_chunk)
    inputs = {tuple(q.shape), tuple(neg.shape)}
    return max((torch.Size(s).numel() for s in rec.shapes if s not in inputs), default=0)


def test_backward_temporaries_are_bounded_by_the_chunk_not_the_batch():
    """B = 128 rows of D = 8 in 16 x 16 chunks: besides tensors shaped like an input (the gradients and
    the bf16 candidates' residual), no temporary exceeds one chunk's [L, 16, 16] coefficient block, its
    [16, K, D] buffers or a per-row vector [L, B] -- a [B, B] block (16,384 elements) or a [B, chunk]
    one (2,048) would. With one chunk of all 128 rows the same instrument sees the [L, B, B] block."""
    from embedkit._triton import nce as K

    B, D, L, C = 128, 8, 2, 16
    bound = max(L * C * C, C * D, L * B)
    assert _bwd_temporaries(K, B, D, C, C) <= bound
    assert _bwd_temporaries(K, B, D, B, B) >= L * B * B  # the check can fail
