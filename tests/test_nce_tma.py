"""Both load paths of the NCE score kernels (_nce_fwd_kernel, _nce_bwd_coef_kernel): device-side TMA
descriptors (fp16 / bf16 operands whose base, row stride and level widths are 16-byte multiples; the
forward's two-half split of the candidate tile at several levels) and pointer tiles (everything else,
or nce.TMA = False), each against the float64 dense oracle by the tolerance rule, with the path the
launcher took checked on the launches themselves."""
import pytest
import torch

from test_nce import KERNEL_BACKENDS, check

pytestmark = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no triton backend")


@pytest.fixture
def kernels():
    from embedkit._triton import nce

    return nce


@pytest.fixture
def launches(kernels, monkeypatch):
    """(kernel name, NUM_LEVELS, USE_TMA, SPLIT) of every score-kernel launch, SPLIT as the kernel derives it."""
    seen = []
    real = kernels._launch

    def spy(kernel, grid, *args, _D, **kw):
        blocks = kernels._interp_blocks(_D)
        split = kw["USE_TMA"] and kw["NUM_LEVELS"] > 1 and blocks["BLOCK_N"] >= kw.get("SPLIT_FROM", 1 << 30)
        fn = kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        seen.append((fn.__name__, kw["NUM_LEVELS"], kw["USE_TMA"], split))
        return real(kernel, grid, *args, _D=_D, **kw)
    monkeypatch.setattr(kernels, "_launch", spy)
    return seen


def test_tma_gate(kernels, monkeypatch):
    bf = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert kernels._use_tma((16, 64), bf, bf)
    assert kernels._use_tma((64,), torch.zeros(8, 64, dtype=torch.float16), bf)
    assert not kernels._use_tma((64,), torch.zeros(8, 64), torch.zeros(8, 64))  # fp32: FMA dots, pointer path
    assert not kernels._use_tma((36,), torch.zeros(8, 36, dtype=torch.bfloat16), bf)  # 72-byte rows
    assert not kernels._use_tma((21, 64), bf, bf)  # a level starting at a column not 16-byte aligned
    assert not kernels._use_tma((32,), torch.zeros(8, 64, dtype=torch.bfloat16)[:, 1:33], bf)  # odd base
    monkeypatch.setattr(kernels, "TMA", False)
    assert not kernels._use_tma((16, 64), bf, bf)


# (path, dtype, B, D, K, mrl_dims): "tma" / "split" / "pointer" (switch off) / "stride" (72-byte rows).
CASES = [
    ("tma", torch.bfloat16, 37, 72, 2, [16, 40, 72]),      # unaligned levels: one descriptor per level
    ("tma", torch.float16, 13, 192, 1, [64, 128, 192]),    # aligned levels: one descriptor pair
    ("tma", torch.bfloat16, 21, 48, 0, None),              # one level: the coefficient kernel on TMA too
    ("split", torch.bfloat16, 37, 72, 2, [16, 40, 72]),
    ("split", torch.bfloat16, 40, 192, 1, [64, 128, 192]),
    ("pointer", torch.bfloat16, 37, 72, 2, [16, 40, 72]),
    ("pointer", torch.bfloat16, 21, 48, 0, None),
    ("stride", torch.bfloat16, 19, 36, 1, [8, 16, 36]),
]


@pytest.mark.parametrize("path, dtype, B, D, K, dims", CASES,
                         ids=[f"{c[0]}-{str(c[1]).split('.')[-1]}-D{c[3]}-L{len(c[5] or [1])}" for c in CASES])
@pytest.mark.parametrize("symmetric", [False, True])
def test_load_paths_match_dense_oracle(kernels, launches, monkeypatch, path, dtype, B, D, K, dims, symmetric):
    if path == "pointer":
        monkeypatch.setattr(kernels, "TMA", False)
    if path == "split":  # the interpreter's tiles made wide enough to split into two 16-wide halves
        monkeypatch.setattr(kernels, "_interp_blocks", lambda D: dict(BLOCK_M=16, BLOCK_N=32,
                                                                      BLOCK_D=kernels._block_d(D)))
        monkeypatch.setattr(kernels, "SPLIT_FROM", 32)
        # Two candidate splits of 19 / 20: each ends inside a 32-wide tile, in its second half.
        monkeypatch.setattr(kernels, "FWD_SPLIT", 2)
    check("triton", dtype, B, D, K, ids="dups", tensor_temp=True, symmetric=symmetric, mrl_dims=dims)
    levels = len(dims or [D])
    fwd = [x for x in launches if x[0] == "_nce_fwd_kernel"]
    coef = [x for x in launches if x[0] == "_nce_bwd_coef_kernel"]
    assert fwd and coef
    tma = path in ("tma", "split")
    assert all(x[2] == tma for x in fwd)
    assert all(x[2] == (tma and levels == 1) for x in coef)  # multi-level coefficients: pointer path
    assert all(x[3] == (path == "split") for x in fwd)
