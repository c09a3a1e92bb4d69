"""Hostile inputs (issue 12, memory safety) and validation that syncs once per batch (issue 14).

- cu_seqlens whose int32 steps wrap around are rejected (checked in int64) by every op, PackedBatch
  and check_max_seqlen; from_lengths refuses totals past int32.
- With validation off, bad cu_seqlens (last > T, negative, decreasing, wrapping) make the Triton
  pool kernels (under the interpreter here) neither read nor write outside their tensors: canary
  regions around inputs and outputs stay untouched, and every row of d_hidden is written.
- pool_project's matmul kernel offsets are int64 (a strided view reaches offsets past 2^31 with a
  few touched pages).
- No C++ exception crosses the native C ABI (bad_alloc, length_error, std::thread failure), and
  pack / unpack never call memcpy with null pointers (a UBSan build of the CPU twin).
- Token counts are integers in the native and reference masked_mean (a 20M-token sequence).
- A model forward with validation on makes a number of host syncs that does not grow with depth.
"""
from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import embedkit
from embedkit import PackedBatch
from embedkit.ops import _checks, _native, reference
from embedkit._triton import pool_project as pp

from test_native import _ensure_library

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
I32 = torch.int32
INT32_MAX = 2 ** 31 - 1
T = 10
# Each wraps int32 steps into non-negative ones (cu[1:] - cu[:-1] in int32 passed them before).
WRAPPING = [0, INT32_MAX, -2 ** 31, -1, T]


def _cu(values) -> torch.Tensor:
    return torch.tensor(values, dtype=I32)


@pytest.fixture(scope="module", autouse=True)
def native_library():
    _ensure_library("cpu")


# ---- int64 validation of cu_seqlens ---------------------------------------------------------------

def test_wrapping_cu_seqlens_rejected_by_the_checks_and_packed_batch():
    cu = _cu(WRAPPING)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        _checks.check_cu_seqlens(cu, T, CPU)
    with pytest.raises(ValueError, match="non-decreasing"):
        PackedBatch(cu)
    with pytest.raises(ValueError, match="non-decreasing"):
        PackedBatch(cu, max_seqlen=INT32_MAX)
    with pytest.raises(ValueError, match="cu_seqlens"):
        _checks.check_max_seqlen(INT32_MAX, cu)
    # Entries past T with steps that stay non-negative only through the wrap.
    with pytest.raises(ValueError, match="cu_seqlens"):
        _checks.check_cu_seqlens(_cu([0, INT32_MAX, -2 ** 31 + 5, T]), T, CPU)


@pytest.mark.parametrize("backend", ["reference", "triton", "native"])
def test_wrapping_cu_seqlens_rejected_by_the_pool_ops(backend):
    hidden = torch.rand(T, 8)
    weight = torch.rand(4, 8)
    cu = _cu(WRAPPING)
    with embedkit.use_backend(backend):
        with pytest.raises(ValueError, match="cu_seqlens"):
            embedkit.masked_mean(hidden, cu)
        if backend != "native":
            with pytest.raises(ValueError, match="cu_seqlens"):
                embedkit.pool_project(hidden, cu, weight)


def test_wrapping_cu_seqlens_rejected_by_attention():
    q = torch.rand(T, 2, 8)
    with embedkit.use_backend("reference"), pytest.raises(ValueError, match="cu_seqlens"):
        embedkit.varlen_attention(q, q, q, _cu(WRAPPING), 4)


def test_native_twin_rejects_wrapping_cu_seqlens_even_with_validation_off():
    embedkit.set_validation(False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        _native.masked_mean(torch.rand(T, 4), _cu(WRAPPING), None)


@pytest.mark.parametrize("lengths", [[INT32_MAX, 10], [2 ** 32], [2 ** 31], [2 ** 62, 2 ** 62, 2 ** 62, 2 ** 62]])
def test_from_lengths_refuses_totals_past_int32(lengths):
    with pytest.raises(ValueError, match="int32"):
        PackedBatch.from_lengths(lengths)


def test_from_lengths_accepts_the_int32_maximum():
    batch = PackedBatch.from_lengths([INT32_MAX, 0])
    assert batch.total_tokens == INT32_MAX and batch.max_seqlen == INT32_MAX
    assert batch.cu_seqlens.tolist() == [0, INT32_MAX, INT32_MAX]


def test_max_seqlen_past_int32_is_refused():
    with pytest.raises(ValueError, match="max_seqlen"):
        _checks.check_max_seqlen(2 ** 31, _cu([0, 3]))


# ---- validation off: the Triton pool kernels stay inside their tensors ------------------------------
# Canaries: hidden is a view into a buffer whose rows around it hold SENTINEL (a read of them shows
# up as |mean| > 1: hidden is in [-1, 1]); outputs are views into buffers pre-filled with GUARD
# around them and UNWRITTEN inside them.

SENTINEL, GUARD, UNWRITTEN = 1.0e4, -777.0, 12345.0
PAD = 16  # canary rows on each side (bad offsets in BAD_CU reach at most 3 rows out, or wrap)
B = 3
BAD_CU = {
    "last_past_T": [0, 4, 7, T + 3],
    "negative": [0, -3, 5, T],
    "negative_first": [-2, 4, 7, T],
    "decreasing": [0, 8, 3, T],
    "last_below_T": [0, 3, 5, 6],
    "wrapping": [0, INT32_MAX, -2 ** 31, T],
}


def _guarded(rows: int, width: int, inside: float, outside: float, dtype=torch.float32):
    buf = torch.full((rows + 2 * PAD, width), outside, dtype=dtype)
    view = buf[PAD:PAD + rows]
    view.fill_(inside)
    return buf, view


def _assert_guards(buf: torch.Tensor, rows: int, value: float, what: str) -> None:
    outside = torch.cat([buf[:PAD], buf[PAD + rows:]])
    assert bool((outside == value).all()), f"{what}: a write landed outside the output tensor"


# Empty sequences (bad cu_seqlens) give 0/0 = NaN under the interpreter, with NumPy's warning.
_NAN_OK = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def validation_off():
    embedkit.set_validation(False)
    yield
    embedkit.set_validation(True)


@_NAN_OK
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("case", list(BAD_CU))
@pytest.mark.parametrize("masked", [False, True])
def test_triton_masked_mean_kernels_stay_in_bounds(case, splits, masked, validation_off):
    H = 8
    cu = _cu(BAD_CU[case])
    hbuf, hidden = _guarded(T, H, 0.0, SENTINEL)
    hidden.copy_(torch.rand(T, H) * 2 - 1)
    mask = (torch.arange(T) % 3 != 1) if masked else None
    pooled, counts = pp.masked_mean_fwd(hidden, cu, mask, splits=splits)
    finite = torch.isfinite(pooled)
    # Wrong numbers are allowed, foreign data is not: every mean is of rows of hidden (or 0/0).
    assert bool((pooled[finite].abs() <= 1.0 + 1e-6).all()), f"{case}: read outside hidden"
    assert bool(((counts >= 0) & (counts <= T)).all()), counts

    # Forward outputs in canaried buffers (the kernel itself, fixed interpreter blocks).
    obuf, out = _guarded(B, H, UNWRITTEN, GUARD)
    if splits == 1:
        cbuf, cnt = _guarded(B, 1, UNWRITTEN, GUARD)
        cnt = cnt.view(B)
    else:
        obuf, out = _guarded(splits * B, H, UNWRITTEN, GUARD)
        cbuf, cnt = _guarded(splits * B, 1, 0, -777, dtype=torch.int32)
        cnt = cnt.view(splits * B)
    mask_arg = mask.view(torch.uint8) if masked else cu
    pp._mean_launch(pp._masked_mean_kernel, lambda meta: (B, triton_cdiv(H, meta["BLOCK_H"]), splits),
                    hidden, hidden.stride(0), cu, mask_arg, out, cnt, T, H, splits,
                    HAS_MASK=masked, FINAL=splits == 1)
    _assert_guards(obuf, out.shape[0], GUARD, f"{case}: masked_mean out")
    _assert_guards(cbuf, cnt.shape[0], GUARD if splits == 1 else -777, f"{case}: masked_mean counts")
    assert not bool((out == UNWRITTEN).any()), f"{case}: an output row was left unwritten"

    # Backward: d_hidden [T, H] inside canaries; every row must be written, nothing outside.
    dbuf, d_hidden = _guarded(T, H, UNWRITTEN, GUARD)
    d_pooled = torch.rand(B, H)
    ones = torch.ones(B)
    pp._mean_launch(pp._masked_mean_bwd_kernel, lambda meta: (B, triton_cdiv(H, meta["BLOCK_H"]), splits),
                    d_pooled, ones, cu, mask_arg, d_hidden, d_hidden.stride(0), T, H, splits,
                    HAS_MASK=masked)
    _assert_guards(dbuf, T, GUARD, f"{case}: d_hidden")
    assert not bool((d_hidden == UNWRITTEN).any()), f"{case}: rows of d_hidden were left uninitialised"


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@_NAN_OK
@pytest.mark.parametrize("backend", ["triton", "reference", "native"])
@pytest.mark.parametrize("case", list(BAD_CU))
def test_pool_ops_with_validation_off_touch_only_their_tensors(backend, case, validation_off):
    """The public ops on bad cu_seqlens, validation off: wrong numbers or a clear error (the native
    CPU twin always checks), never data from outside hidden; the backward runs too."""
    H = 8
    cu = _cu(BAD_CU[case])
    hbuf, hidden = _guarded(T, H, 0.0, SENTINEL)
    hidden.copy_(torch.rand(T, H) * 2 - 1)
    hidden.requires_grad_(True)
    with embedkit.use_backend(backend):
        try:
            pooled = embedkit.masked_mean(hidden, cu)
        except ValueError as err:
            assert backend == "native" and "cu_seqlens" in str(err)
            return
        finite = torch.isfinite(pooled)
        assert bool((pooled[finite].abs() <= 1.0 + 1e-6).all()), f"{case}: read outside hidden"
        (g,) = torch.autograd.grad(pooled.nan_to_num().sum(), hidden)
        assert g.shape == hidden.shape
        if backend != "native":
            eye = torch.eye(H)  # out = pooled: bounded by hidden's values as well
            out = embedkit.pool_project(hidden, cu, eye)
            finite = torch.isfinite(out)
            assert bool((out[finite].abs() <= 1.0 + 1e-5).all()), f"{case}: read outside hidden"
            (g,) = torch.autograd.grad(out.nan_to_num().sum(), hidden)
            assert g.shape == hidden.shape
    assert bool((torch.cat([hbuf[:PAD], hbuf[PAD + T:]]) == SENTINEL).all())


def test_reference_segment_ids_are_safe_for_any_cu_seqlens():
    for values in BAD_CU.values():
        seg = reference.segment_ids(_cu(values), T)
        assert seg.shape == (T,) and int(seg.min()) >= 0 and int(seg.max()) < B
        assert bool((seg[1:] >= seg[:-1]).all())
    # A valid cu_seqlens is read unchanged.
    assert reference.segment_ids(_cu([0, 2, 2, 5]), 5).tolist() == [0, 0, 2, 2, 2]


# ---- the native C ABI: no C++ exception escapes, no memcpy of null pointers ---------------------------

def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=str(ROOT))


_CALL_MASKED_MEAN = """
    import resource, torch
    from embedkit.ops import _native
    dev = torch.device("cpu")
    lib, kind = _native._require(dev)
    cu = torch.zeros(2, dtype=torch.int32)
    out, counts = torch.empty(16), torch.empty(1)
    def call(width):
        # total_rows 0, batch 1: the twin allocates its fp32 accumulators of `width` first.
        _native._call(lib, kind, "ek_masked_mean", dev, None, 0, 0, width, width, cu.data_ptr(), None, 1,
                      out.data_ptr(), counts.data_ptr())
"""


def test_bad_alloc_in_the_cpu_twin_becomes_memory_error():
    """std::bad_alloc (here: a 32 GiB std::vector under a 1 GiB address-space limit) used to cross the
    extern "C" boundary and abort Python; now it is a status code and a MemoryError."""
    r = _run_python(_CALL_MASKED_MEAN + """
    vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    try:
        call(1 << 33)
    except MemoryError as err:
        print("MemoryError:", err)
    """)
    assert r.returncode == 0, f"the process died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert "MemoryError:" in r.stdout and "out of host memory" in r.stdout, r.stdout + r.stderr


def test_other_cpp_exceptions_become_runtime_error():
    """std::length_error (a std::vector past max_size) is caught at the ABI too."""
    r = _run_python(_CALL_MASKED_MEAN + """
    try:
        call(1 << 62)
    except RuntimeError as err:
        print("RuntimeError:", err)
    """)
    assert r.returncode == 0, f"the process died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert "RuntimeError:" in r.stdout and "C++ exception" in r.stdout, r.stdout + r.stderr


def test_thread_start_failure_falls_back_to_the_calling_thread():
    """std::thread throws std::system_error when no thread can be started (here: no address space
    for its stack); the twin used to abort, now it runs the work on the calling thread."""
    r = _run_python("""
    import resource, torch, embedkit
    from embedkit.ops import reference
    torch.set_num_threads(2)
    hidden = torch.rand(4400, 1024)              # 17 MiB: the twin splits 2 sequences over 2 threads
    cu = torch.tensor([0, 2200, 4400], dtype=torch.int32)
    want = reference.masked_mean(hidden, cu)
    out = torch.empty(2, 1024)
    from embedkit.ops import _native
    lib, kind = _native._require(torch.device("cpu"))
    counts = torch.empty(2)
    vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 20), resource.RLIM_INFINITY))
    _native._call(lib, kind, "ek_masked_mean", torch.device("cpu"), hidden.data_ptr(), 0, 4400, 1024, 1024,
                  cu.data_ptr(), None, 2, out.data_ptr(), counts.data_ptr())
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    torch.testing.assert_close(out, want)
    print("ok", counts.tolist())
    """)
    assert r.returncode == 0, f"the process died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert "ok [2200.0, 2200.0]" in r.stdout, r.stdout + r.stderr


def test_pack_unpack_never_memcpy_null_pointers(tmp_path):
    """Rows of 0 bytes with null pointers (empty tensors): memcpy(NULL, NULL, 0) is undefined
    behaviour. The CPU twin built with UBSan (aborting on the first report) must run clean."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    lib = tmp_path / "libembedkit_cpu_ubsan.so"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-fsanitize=undefined",
                            "-fno-sanitize-recover=all", f"-I{ROOT / 'csrc' / 'include'}",
                            str(ROOT / "csrc" / "cpu" / "embedkit_cpu.cpp"), "-o", str(lib), "-lpthread"],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        pytest.skip(f"no UBSan build here: {build.stderr[-500:]}")
    r = _run_python(f"""
    import ctypes
    lib = ctypes.CDLL({str(lib)!r})
    P, I = ctypes.c_void_p, ctypes.c_int64
    cu = (ctypes.c_int32 * 3)(0, 2, 3)
    lib.ek_pack_cpu.argtypes = [P, P, P, I, I, I, I, P]
    lib.ek_unpack_cpu.argtypes = [P, P, P, I, I, I, I, P, P]
    cu_p = ctypes.cast(cu, P)
    print("pack", lib.ek_pack_cpu(None, None, cu_p, 2, 2, 0, 3, None))
    print("unpack", lib.ek_unpack_cpu(None, None, cu_p, 2, 2, 0, 3, None, None))
    """)
    assert r.returncode == 0 and "runtime error" not in r.stderr, r.stderr[-2000:]
    assert "pack 0" in r.stdout and "unpack 0" in r.stdout, r.stdout


# ---- integer token counts -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "reference"])
def test_masked_mean_of_a_20m_token_sequence(backend):
    """20M tokens (past fp32's 2^24) of alternating 1, 2: the mean is exactly 1.5. An fp32 count
    stalled at 2^24 and an fp32 row-by-row sum at 2^25, which gave 2.0."""
    n = 20_000_000
    hidden = torch.tensor([1.0, 2.0], dtype=torch.float16).repeat(n // 2)[:, None]
    cu = _cu([0, n])
    with embedkit.use_backend(backend):
        out = embedkit.masked_mean(hidden, cu)
        assert out.item() == 1.5
        if backend == "reference":  # the pool-mask path counts by a prefix sum
            mask = torch.ones(n, dtype=torch.bool)
            mask[-2:] = False  # drop one 1 and one 2
            assert embedkit.masked_mean(hidden, cu, mask).item() == 1.5


# ---- validation syncs once per PackedBatch ------------------------------------------------------------

class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts host reads of tensor contents: item() / bool() / int() (aten._local_scalar_dense),
    nonzero, torch.equal; .tolist() is counted by a patch (it does not dispatch)."""

    OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _count_syncs(fn, monkeypatch) -> int:
    counter = _SyncCounter()
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        counter.count += 1
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    try:
        with counter:
            fn()
    finally:
        monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
    return counter.count


def _model_syncs(num_layers: int, monkeypatch, *, validation: bool, inference: bool = False) -> int:
    torch.manual_seed(0)
    model = embedkit.Embedder(embedkit.EmbedderConfig.tiny(num_layers=num_layers)).eval()
    embedkit.set_validation(validation)
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        inputs = model.processor(["a short text", "another, somewhat longer, text input"], task="search")
        return _count_syncs(lambda: model(inputs, dim=32), monkeypatch)


@pytest.mark.parametrize("inference", [False, True])
def test_validation_syncs_do_not_grow_with_depth(monkeypatch, inference):
    """Syncs that validation adds to a forward (with validation on minus off, on the CPU backends,
    whose reference attention reads cu_seqlens itself) are the same for 1 and 4 layers."""
    added = {}
    for layers in (1, 4):
        on = _model_syncs(layers, monkeypatch, validation=True, inference=inference)
        off = _model_syncs(layers, monkeypatch, validation=False, inference=inference)
        added[layers] = on - off
    assert added[1] == added[4], f"validation syncs per forward by depth: {added}"


def test_validated_cu_seqlens_checked_again_after_an_in_place_write(monkeypatch):
    cu = _cu([0, 3, 5])
    _checks.check_cu_seqlens(cu, 5, CPU)
    assert _count_syncs(lambda: (_checks.check_cu_seqlens(cu, 5, CPU), _checks.check_max_seqlen(3, cu)),
                        monkeypatch) == 0
    with pytest.raises(ValueError, match="max_seqlen"):
        _checks.check_max_seqlen(2, cu)  # what was learned still checks
    with pytest.raises(ValueError, match="T = 6"):
        _checks.check_cu_seqlens(cu, 6, CPU)
    cu[1] = 7  # in place: the version counter moves, the tensor is read again
    with pytest.raises(ValueError, match="non-decreasing"):
        _checks.check_cu_seqlens(cu, 5, CPU)
    cu[1] = 3
    _checks.check_cu_seqlens(cu, 5, CPU)
    cu[1:].fill_(9)  # through a view (views share the version counter)
    with pytest.raises(ValueError, match="T = 5"):
        _checks.check_cu_seqlens(cu, 5, CPU)


def test_validation_memory_does_not_leak_and_never_confuses_tensors():
    gc.collect()
    before = len(_checks._validated)
    for i in range(200):
        cu = _cu([0, i % 7, 7])
        _checks.check_cu_seqlens(cu, 7, CPU)
        del cu
    gc.collect()
    assert len(_checks._validated) <= before + 1
    good = _cu([0, 2, 4])
    _checks.check_cu_seqlens(good, 4, CPU)
    bad = _cu([0, 5, 4])  # a different tensor with other contents is read on its own
    with pytest.raises(ValueError, match="non-decreasing"):
        _checks.check_cu_seqlens(bad, 4, CPU)


def test_inference_tensors_are_never_remembered():
    with torch.inference_mode():
        cu = _cu([0, 2, 4])
        _checks.check_cu_seqlens(cu, 4, CPU)
        assert _checks._recall(cu) is None
        cu[1] = 9  # invisible to a version counter: must be read again
        with pytest.raises(ValueError, match="non-decreasing"):
            _checks.check_cu_seqlens(cu, 4, CPU)
        batch = PackedBatch(_cu([0, 2, 4]))  # keeps a normal tensor, remembered once for all layers
        assert not batch.cu_seqlens.is_inference() and _checks._recall(batch.cu_seqlens) == (4, 2)
