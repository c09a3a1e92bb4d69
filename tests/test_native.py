"""The native backend (csrc/): the C++ CPU library against the references, the CUDA library's
compile, and (gpu-marked) the CUDA library against the references and the Triton kernel.

The CPU library is built by the session fixture when it is missing or older than its sources,
so `pytest` works on a fresh clone (needs cmake and a C++ compiler).
"""
from __future__ import annotations

import ctypes
import re

import pytest
import torch
from hypothesis import given, strategies as st

import embedkit
from embedkit import _build
from embedkit.ops import _dispatch, _native, reference
from embedkit.ops._dispatch import BackendUnavailableError

from numerics import assert_by_rule, grads, leaf

CPU = torch.device("cpu")
DEVICES = [pytest.param(CPU, id="cpu"),
           pytest.param(torch.device("cuda"), id="cuda", marks=pytest.mark.gpu)]


def _ensure_library(kind: str) -> None:
    """Build the library if it is missing or older than csrc/ (the CUDA one needs nvcc: without
    it an existing library is used as is, and a missing one skips the CUDA tests)."""
    path = _native.library_path(kind)
    if _build.is_stale(path):
        if kind == "cuda" and _build.find_nvcc() is None:
            if not path.exists():
                pytest.skip("no libembedkit_cuda.so and no nvcc to build it")
        else:
            _build.build(cuda=kind == "cuda")
    _native.reload()
    why = _native.problem("pack", torch.device(kind))
    assert why is None, why


@pytest.fixture(scope="session", autouse=True)
def native_cpu_library():
    _ensure_library("cpu")
    yield
    _native.reload()


@pytest.fixture(scope="module")
def dev(request):
    device = request.param
    if device.type == "cuda":
        _ensure_library("cuda")
    return device


def parametrize_devices(fn):
    return pytest.mark.parametrize("dev", DEVICES, indirect=True)(fn)


def cu_of(lengths, device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


lengths_st = st.lists(st.integers(0, 12), min_size=1, max_size=6)

# ---- sequence_fingerprint ---------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _fmix64_int(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _M64
    return x ^ (x >> 33)


def _fingerprint_spec(data: bytes) -> int:
    """The definition of embedkit.h in Python integers (exact uint64 arithmetic)."""
    n = len(data)
    total = 0
    for k in range((n + 3) // 4):
        word = int.from_bytes(data[4 * k:4 * k + 4].ljust(4, b"\0"), "little")
        total = (total + _fmix64_int(((k << 32) | word) ^ 0x9E3779B97F4A7C15)) & _M64
    out = _fmix64_int((total + _fmix64_int(n ^ 0xD6E8FEB86659FD93)) & _M64)
    return out - (1 << 64) if out >= 1 << 63 else out


def test_fingerprint_matches_its_definition():
    values = torch.tensor([[1, 2, 3], [250, 7, 0], [9, 9, 9], [0, 0, 1], [5, 4, 3]], dtype=torch.uint8)
    cu = cu_of([2, 0, 3], CPU)
    expected = [_fingerprint_spec(values[s:e].numpy().tobytes()) for s, e in [(0, 2), (2, 2), (2, 5)]]
    assert reference.sequence_fingerprint(values, cu).tolist() == expected
    assert _native.sequence_fingerprint(values, cu).tolist() == expected
    ids = torch.tensor([101, 2023, -7, 102], dtype=torch.int64)
    assert embedkit.sequence_fingerprint(ids, cu_of([4], CPU)).tolist() == [
        _fingerprint_spec(ids.numpy().tobytes())]


_FP_DTYPES = [torch.int32, torch.int64, torch.uint8, torch.int16, torch.bool, torch.float16,
              torch.bfloat16, torch.float32, torch.float64]


def _random_values(total: int, trailing: tuple, dtype: torch.dtype, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        x = torch.randint(0, 2, (total, *trailing), generator=gen).bool()
    elif dtype.is_floating_point:
        x = torch.randn(total, *trailing, generator=gen).to(dtype)
    else:
        info = torch.iinfo(dtype)
        x = torch.randint(max(info.min, -50000), min(info.max, 50000), (total, *trailing), generator=gen, dtype=dtype)
    return x.to(device)


@parametrize_devices
@given(lengths=lengths_st, dtype=st.sampled_from(_FP_DTYPES), trailing=st.sampled_from([(), (3,), (2, 5)]),
       seed=st.integers(0, 2 ** 16))
def test_fingerprint_bit_identical_to_reference(dev, lengths, dtype, trailing, seed):
    cu = cu_of(lengths, dev)
    values = _random_values(sum(lengths), trailing, dtype, seed, dev)
    expected = reference.sequence_fingerprint(values, cu)
    with embedkit.use_backend("native"):
        got = embedkit.sequence_fingerprint(values, cu)
    assert got.dtype == torch.int64 and got.shape == (len(lengths),) and got.device == dev
    assert torch.equal(got, expected)
    if dev.type == "cuda":  # the same bits on every device
        assert torch.equal(got.cpu(), reference.sequence_fingerprint(values.cpu(), cu.cpu()))


@parametrize_devices
def test_fingerprint_long_and_misaligned_sequences(dev):
    """Many words per sequence (every thread of a block busy, vector loads) and sequence starts
    that are not 16-, 8- or 4-byte aligned."""
    lengths = [5000, 1, 3, 4097, 0, 777]
    cu = cu_of(lengths, dev)
    for dtype, trailing in [(torch.int64, ()), (torch.uint8, (3,)), (torch.float16, (1,)), (torch.int32, (4,))]:
        values = _random_values(sum(lengths), trailing, dtype, 0, dev)
        with embedkit.use_backend("native"):
            got = embedkit.sequence_fingerprint(values, cu)
        assert torch.equal(got, reference.sequence_fingerprint(values, cu)), dtype


def test_fingerprint_semantics():
    fp = embedkit.sequence_fingerprint
    ids = torch.tensor([5, 6, 7, 5, 6, 7, 7, 6, 5, 5, 6])
    cu = cu_of([3, 3, 3, 2], CPU)
    a, b, c, d = fp(ids, cu).tolist()
    assert a == b            # equal sequences
    assert a != c            # same tokens, other order
    assert d != a            # a prefix
    assert torch.equal(fp(ids.int(), cu), fp(ids, cu))  # int32 and int64 ids agree
    zeros = torch.zeros(3, dtype=torch.int64)
    e0, e1, e2 = fp(zeros, cu_of([0, 1, 2], CPU)).tolist()
    assert len({e0, e1, e2}) == 3  # the length counts: [], [0], [0, 0] differ
    rows = torch.randn(6, 4)
    r = fp(rows, cu_of([2, 2, 2], CPU))
    rows2 = rows.clone()
    rows2[3, 1] = rows2[3, 1].nextafter(torch.tensor(10.0))  # one bit
    r2 = fp(rows2, cu_of([2, 2, 2], CPU))
    assert r[0] == r2[0] and r[2] == r2[2] and r[1] != r2[1]


def test_fingerprint_duplicate_texts_give_equal_query_ids():
    """Two identical texts in one batch get the same id, so nce_loss masks them as duplicates
    of each other (query_ids[j] == query_ids[i]) and no other pair."""
    texts = ["a cat on a mat", "the quick brown fox", "a cat on a mat", "a cat on a mat.", ""]
    token_ids = [torch.tensor(list(t.encode()), dtype=torch.int64) for t in texts]
    ids = torch.cat(token_ids)
    cu = cu_of([len(t) for t in token_ids], CPU)
    for backend in ("native", "reference"):
        with embedkit.use_backend(backend):
            query_ids = embedkit.sequence_fingerprint(ids, cu)
        assert query_ids.dtype == torch.int64 and query_ids.shape == (len(texts),)
        same = query_ids[:, None] == query_ids[None, :]
        expected = torch.eye(len(texts), dtype=torch.bool)
        expected[0, 2] = expected[2, 0] = True
        assert torch.equal(same, expected)
    nce_loss = getattr(embedkit, "nce_loss", None)
    if nce_loss is not None:  # the loss accepts them as ids (duplicate masking is tested there)
        q, t = torch.randn(len(texts), 8), torch.randn(len(texts), 8)
        assert torch.isfinite(nce_loss(q, t, query_ids=query_ids, target_ids=query_ids))


def test_fingerprint_bad_inputs():
    fp = embedkit.sequence_fingerprint
    ids = torch.arange(6)
    with pytest.raises(TypeError, match="cu_seqlens"):
        fp(ids, torch.tensor([0, 6]))  # int64 cu_seqlens
    with pytest.raises(ValueError, match="cu_seqlens"):
        fp(ids, cu_of([2, 3], CPU))  # does not end at T
    with pytest.raises(ValueError, match="non-decreasing"):
        fp(ids, torch.tensor([0, 4, 2, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="0-d"):
        fp(torch.tensor(3), cu_of([0], CPU))
    with pytest.raises(TypeError, match="values"):
        fp([1, 2, 3], cu_of([3], CPU))
    # The wrapper refuses what the C function must not see, before any pointer is passed.
    with pytest.raises(ValueError, match="contiguous"):
        _native.sequence_fingerprint(torch.zeros(6, 4)[:, ::2], cu_of([6], CPU))
    with pytest.raises(ValueError, match="int32"):
        _native.sequence_fingerprint(ids, torch.tensor([0, 6]))
    # With validation off, the C++ twin still rejects bad cu_seqlens (it reads them for free).
    embedkit.set_validation(False)
    with pytest.raises(ValueError, match="cu_seqlens"), embedkit.use_backend("native"):
        fp(ids, torch.tensor([0, 7, 6], dtype=torch.int32))


# ---- pack / unpack ----------------------------------------------------------------------------------

@st.composite
def padded_layouts(draw):
    """(lengths, padded_len, mask or None): arbitrary / left / right padding, or no mask."""
    batch = draw(st.integers(1, 5))
    padded_len = draw(st.integers(0, 12))
    kind = draw(st.sampled_from(["none", "left", "right", "any"]))
    if kind == "any":
        rows = [draw(st.lists(st.booleans(), min_size=padded_len, max_size=padded_len)) for _ in range(batch)]
        mask = torch.tensor(rows, dtype=torch.bool).reshape(batch, padded_len)
        return mask.sum(1).tolist(), padded_len, mask
    lengths = draw(st.lists(st.integers(0, padded_len), min_size=batch, max_size=batch))
    if kind == "none":
        return lengths, padded_len, None
    pos = torch.arange(padded_len)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = pos < n if kind == "right" else pos >= padded_len - n
    return lengths, padded_len, mask


_PACK_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool, torch.float64]


@parametrize_devices
@given(layout=padded_layouts(), dtype=st.sampled_from(_PACK_DTYPES),
       trailing=st.sampled_from([(), (3,), (4, 2), (16,)]), seed=st.integers(0, 2 ** 16),
       padding_value=st.sampled_from([0, 1, -3.0]))
def test_pack_unpack_match_reference(dev, layout, dtype, trailing, seed, padding_value):
    lengths, padded_len, mask = layout
    if dtype in (torch.uint8, torch.bool):
        padding_value = abs(padding_value) % 2  # representable in the dtype
    batch = len(lengths)
    cu = cu_of(lengths, dev)
    mask = None if mask is None else mask.to(dev)
    padded = _random_values(batch * padded_len, trailing, dtype, seed, dev).reshape(batch, padded_len, *trailing)
    with embedkit.use_backend("native"):
        packed = embedkit.ops.pack(padded, cu, mask)
        back = embedkit.ops.unpack(packed, cu, padded_len, attention_mask=mask, padding_value=padding_value)
    expected = reference.pack(padded, cu, mask)
    assert packed.shape == (sum(lengths), *trailing) and packed.dtype == dtype
    assert torch.equal(packed, expected)
    assert torch.equal(back, reference.unpack(expected, cu, padded_len, mask, padding_value))
    with embedkit.use_backend("native"):  # pack(unpack(x)) == x
        assert torch.equal(embedkit.ops.pack(back, cu, mask), packed)


@parametrize_devices
def test_pack_large_rows_and_many_tiles(dev):
    """Rows wide enough for 16-byte copies and few rows per tile; long rows of tiny tokens with
    many tiles per sequence (the mask count before each tile)."""
    gen = torch.Generator().manual_seed(1)
    for batch, padded_len, trailing, dtype in [(3, 70, (4096,), torch.bfloat16), (2, 20000, (), torch.int64),
                                               (4, 300, (3,), torch.uint8)]:
        mask = (torch.rand(batch, padded_len, generator=gen) < 0.7).to(dev)
        cu = cu_of(mask.sum(1).tolist(), dev)
        padded = _random_values(batch * padded_len, trailing, dtype, 3, dev).reshape(batch, padded_len, *trailing)
        with embedkit.use_backend("native"):
            packed = embedkit.ops.pack(padded, cu, mask)
            back = embedkit.ops.unpack(packed, cu, attention_mask=mask, padding_value=7)
        assert torch.equal(packed, reference.pack(padded, cu, mask))
        assert torch.equal(back, reference.unpack(packed, cu, padded_len, mask, 7))


@parametrize_devices
def test_pack_unpack_gradients(dev):
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool, device=dev)
    cu = cu_of([2, 4, 0], dev)
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=dev)
    g = torch.randn(6, 5, dtype=torch.float64, device=dev)
    xr = leaf(x)
    (ref_grad,) = torch.autograd.grad(reference.pack(xr, cu, mask), xr, g)
    xn = leaf(x)
    with embedkit.use_backend("native"):
        (nat_grad,) = torch.autograd.grad(embedkit.ops.pack(xn, cu, mask), xn, g)
    assert torch.equal(nat_grad, ref_grad)
    p = leaf(torch.randn(6, 5, dtype=torch.float64, device=dev))
    gp = torch.randn(3, 4, 5, dtype=torch.float64, device=dev)
    (ref_grad,) = torch.autograd.grad(reference.unpack(p, cu, 4, mask, 2.0), p, gp)
    with embedkit.use_backend("native"):
        (nat_grad,) = torch.autograd.grad(embedkit.ops.unpack(p, cu, 4, attention_mask=mask, padding_value=2.0),
                                          p, gp)
    assert torch.equal(nat_grad, ref_grad)
    with embedkit.use_backend("native"):
        torch.autograd.gradcheck(lambda t: embedkit.ops.pack(t, cu, mask), (leaf(x),))


@parametrize_devices
def test_packed_batch_uses_native_pack(dev, monkeypatch):
    mask = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 1, 1]], device=dev)  # int64, like a tokenizer's
    x = torch.randn(3, 3, 4, device=dev, requires_grad=True)
    calls = []
    real_pack, real_unpack = _native.pack, _native.unpack
    monkeypatch.setattr(_native, "pack", lambda *a: calls.append("pack") or real_pack(*a))
    monkeypatch.setattr(_native, "unpack", lambda *a: calls.append("unpack") or real_unpack(*a))
    with embedkit.use_backend("reference"):
        ref_packed, ref_batch = embedkit.PackedBatch.from_padded(x, mask)
        ref_padded = ref_batch.pad(ref_packed, padding_value=-1.0)
    assert calls == []
    for backend in ("native", "auto"):
        with embedkit.use_backend(backend):
            packed, batch = embedkit.PackedBatch.from_padded(x, mask)
            padded = batch.pad(packed, padding_value=-1.0)
            (grad,) = torch.autograd.grad(padded.sum(), x)
        assert torch.equal(packed, ref_packed) and torch.equal(padded, ref_padded)
        assert torch.equal(grad, mask.to(grad.dtype)[..., None].expand_as(grad))
    assert calls == ["pack", "unpack", "pack", "unpack"] * 2  # forward; backward runs the adjoints
    # Right-padded (from_lengths: no mask) and hand-made increasing token_indices.
    with embedkit.use_backend("native"):
        b = embedkit.PackedBatch.from_lengths([2, 0, 3], device=dev)
        packed = torch.arange(5 * 2, device=dev).reshape(5, 2)
        padded = b.pad(packed)
        assert padded.shape == (3, 3, 2) and torch.equal(b.unpad(padded), packed)
        h = embedkit.PackedBatch(cu_of([1, 2], dev), token_indices=torch.tensor([1, 2, 3], device=dev),
                                 padded_len=2)
        assert torch.equal(h.pad(torch.tensor([7, 8, 9], device=dev)), torch.tensor([[0, 7], [8, 9]], device=dev))
    with embedkit.use_backend("reference"):
        assert torch.equal(b.pad(packed), padded)


@pytest.mark.gpu
def test_cuda_kernels_run_on_the_current_stream():
    _ensure_library("cuda")
    dev = torch.device("cuda")
    mask = torch.rand(64, 300, device=dev) < 0.5
    cu = cu_of(mask.sum(1).tolist(), dev)
    padded = torch.randn(64, 300, 256, device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), embedkit.use_backend("native"):
        packed = embedkit.ops.pack(padded, cu, mask)
        fp = embedkit.sequence_fingerprint(packed, cu)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(packed, reference.pack(padded, cu, mask))
    assert torch.equal(fp, reference.sequence_fingerprint(packed, cu))


def test_strided_and_expanded_inputs_are_accepted():
    cu = torch.tensor([0, 9, 3, 9, 5, 9], dtype=torch.int32)[::2]  # a strided view
    ids = torch.arange(10)[::2]
    hidden = torch.randn(1, 6).expand(5, 6)  # rows of stride 0
    with embedkit.use_backend("native"):
        fp = embedkit.sequence_fingerprint(ids, cu)
        pooled = embedkit.masked_mean(hidden, cu)
        packed = embedkit.ops.pack(torch.arange(12).reshape(2, 6)[:, ::2],
                                   torch.tensor([0, 5, 2, 5, 4, 5], dtype=torch.int32)[::2])
    assert torch.equal(fp, reference.sequence_fingerprint(ids.contiguous(), cu.contiguous()))
    torch.testing.assert_close(pooled, reference.masked_mean(hidden.contiguous(), cu.contiguous()))
    assert packed.tolist() == [0, 2, 6, 8]


def test_cpu_twins_split_large_batches_over_threads():
    """Calls moving more than 16 MiB run on several threads (up to torch.get_num_threads()): the
    results are bit-identical to one thread's, and a worker's error reaches the caller."""
    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    lengths = torch.randint(200000, 350000, (8,), generator=gen).tolist()
    cu = cu_of(lengths, CPU)
    ids = torch.randint(0, 50000, (sum(lengths),), generator=gen)  # > 16 MiB of int64
    hidden = torch.randn(sum(lengths) // 64, 128, generator=gen)
    cu_h = cu_of([n // 64 for n in lengths[:-1]] + [hidden.shape[0] - sum(n // 64 for n in lengths[:-1])], CPU)
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append((_native.sequence_fingerprint(ids, cu), _native.masked_mean(hidden, cu_h, None)[0]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[1][1], reference.masked_mean(hidden, cu_h))
    mask = torch.rand(8, 2400, generator=gen) < 0.6
    padded = torch.randn(8, 2400, 256, generator=gen)
    cu_p = cu_of(mask.sum(1).tolist(), CPU)
    with embedkit.use_backend("native"):
        packed = embedkit.ops.pack(padded, cu_p, mask)
        assert torch.equal(packed, reference.pack(padded, cu_p, mask))
        assert torch.equal(embedkit.ops.unpack(packed, cu_p, attention_mask=mask),
                           reference.unpack(packed, cu_p, 2400, mask))
    bad = mask.clone()
    bad[6, :] = True  # a row in the second half disagrees with cu_seqlens
    embedkit.set_validation(False)
    with pytest.raises(ValueError, match="row 6 has more tokens"), embedkit.use_backend("native"):
        embedkit.ops.pack(padded, cu_p, bad)


def test_pack_bad_inputs():
    pack, unpack = embedkit.ops.pack, embedkit.ops.unpack
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="attention_mask row 0"):
        pack(x, cu_of([1, 1], CPU), mask)  # the mask and cu_seqlens disagree
    with pytest.raises(ValueError, match="B\\+1 = 3"):
        pack(x, cu_of([2], CPU), mask)
    with pytest.raises(TypeError, match="attention_mask"):
        pack(x, cu_of([2, 1], CPU), mask.float())
    with pytest.raises(ValueError, match="shape"):
        pack(x, cu_of([2, 1], CPU), mask[:, :2])
    with pytest.raises(ValueError, match="more than the padded length"):
        pack(x, cu_of([4, 1], CPU))
    with pytest.raises(ValueError, match="padded must be"):
        pack(torch.randn(5), cu_of([5], CPU))
    with pytest.raises(ValueError, match="width 3 but padded_len = 4"):
        unpack(torch.randn(3, 4), cu_of([2, 1], CPU), 4, attention_mask=mask)
    with pytest.raises(TypeError, match="padding_value"):
        unpack(torch.randn(3, 4), cu_of([2, 1], CPU), 3, padding_value="0")
    with pytest.raises(ValueError, match="mixed devices|is on"):
        pack(x, cu_of([2, 1], torch.device("meta")), mask)
    # The wrappers: contiguity, dtypes and shapes before any pointer is passed.
    with pytest.raises(ValueError, match="contiguous"):
        _native.pack(x.transpose(1, 2), cu_of([2, 1], CPU), None, 3)
    with pytest.raises(TypeError, match="bool or uint8"):
        _native.pack(x, cu_of([2, 1], CPU), mask, 3)
    with pytest.raises(ValueError, match="fill"):
        _native.unpack(torch.randn(3, 4), cu_of([2, 1], CPU), None, 3, torch.zeros(3))
    with pytest.raises(ValueError, match="cpu or cuda"):
        _native.pack(x.to("meta"), cu_of([2, 1], CPU), None, 3)
    with pytest.raises(ValueError, match="mixed devices"):
        _native.pack(x, cu_of([2, 1], torch.device("meta")), None, 3)
    # With validation off, the C++ twin still refuses a mask that disagrees with cu_seqlens.
    embedkit.set_validation(False)
    with pytest.raises(ValueError, match="more tokens|positions"), embedkit.use_backend("native"):
        pack(x, cu_of([1, 1], CPU), mask)
    with pytest.raises(BackendUnavailableError, match="not meta"), embedkit.use_backend("native"):
        pack(x.to("meta"), cu_of([2, 1], torch.device("meta")), total_tokens=3)


# ---- masked_mean ------------------------------------------------------------------------------------

@st.composite
def pooling_cases(draw):
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=5))
    width = draw(st.sampled_from([1, 5, 16, 40]))
    use_mask = draw(st.booleans())
    mask = None
    if use_mask:
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=sum(lengths), max_size=sum(lengths))),
                            dtype=torch.bool)
        for s, n in zip([0, *torch.tensor(lengths).cumsum(0).tolist()], lengths):
            mask[s] = True  # every sequence pools at least one token
    return lengths, width, mask


def _check_masked_mean(backend, dev, lengths, width, mask, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    cu = cu_of(lengths, dev)
    mask = None if mask is None else mask.to(dev)
    hidden = torch.randn(sum(lengths), width, generator=gen).to(dev)
    g = torch.randn(len(lengths), width, generator=gen).to(dev)
    h = leaf(hidden, dtype)
    with embedkit.use_backend(backend):
        out = embedkit.masked_mean(h, cu, mask)
    assert out.dtype == dtype and out.shape == (len(lengths), width)
    (d_h,) = grads(out, [h], g)
    h64, hlow = leaf(hidden, torch.float64), leaf(hidden, dtype)
    oracle, lowp = reference.masked_mean(h64, cu, mask), reference.masked_mean(hlow, cu, mask)
    (d_oracle,) = grads(oracle, [h64], g)
    (d_lowp,) = grads(lowp, [hlow], g)
    assert_by_rule("out", out, oracle, lowp)
    assert_by_rule("d_hidden", d_h, d_oracle, d_lowp, factor=3)
    return out


@given(case=pooling_cases(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2 ** 16))
def test_masked_mean_native(case, dtype, seed):
    _check_masked_mean("native", CPU, *case, dtype, seed)


@given(case=pooling_cases(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2 ** 16))
def test_masked_mean_triton_and_native_agree(case, dtype, seed):
    """The Triton launcher (interpreter here, GPU there) and the native C++ twin (CPU), each by the rule."""
    dev = torch.device("cuda") if torch.cuda.is_available() else CPU
    triton_out = _check_masked_mean("triton", dev, *case, dtype, seed)
    native_out = _check_masked_mean("native", CPU, *case, dtype, seed)
    # Both are fp32 sums rounded once to dtype: they differ at most by summation order.
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(triton_out.cpu(), native_out, **tol)


def test_masked_mean_has_one_gpu_kernel():
    """No native masked_mean on CUDA tensors (the Triton kernel is the GPU one): asking for it says so,
    and auto on a GPU picks Triton."""
    cuda = torch.device("cuda")
    why = _native.problem("masked_mean", cuda)
    assert why is not None and "no masked_mean" in why and "triton" in why
    assert "masked_mean" not in " ".join(_declared_functions("cuda"))
    embedkit.set_backend("native")
    with pytest.raises(BackendUnavailableError, match="no masked_mean"):
        _dispatch.resolve("masked_mean", cuda)


def test_masked_mean_strided_rows_and_wide():
    dev = CPU  # the C++ twin (no native masked_mean on CUDA)
    wide = torch.randn(30, 2 * 1027, device=dev, dtype=torch.bfloat16)
    hidden = wide[:, :1027]  # rows with a stride, width not a multiple of the vector width
    cu = cu_of([7, 20, 3], dev)
    with embedkit.use_backend("native"):
        out = embedkit.masked_mean(hidden, cu)
    assert_by_rule("out", out, reference.masked_mean(hidden.double(), cu), reference.masked_mean(hidden, cu))
    hidden = torch.randn(4000, 256, device=dev, dtype=torch.float16)
    cu = cu_of([1, 3000, 999], dev)
    with embedkit.use_backend("native"):
        out = embedkit.masked_mean(hidden, cu)
    assert_by_rule("out", out, reference.masked_mean(hidden.double(), cu), reference.masked_mean(hidden, cu))


def test_masked_mean_bad_inputs():
    mm = embedkit.masked_mean
    h = torch.randn(5, 4)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        mm(h, cu_of([5, 0], CPU))
    with pytest.raises(ValueError, match="no token with pool_mask"):
        mm(h, cu_of([2, 3], CPU), torch.tensor([True, True, False, False, False]))
    with pytest.raises(TypeError, match="pool_mask"):
        mm(h, cu_of([5], CPU), torch.ones(5))
    with pytest.raises(ValueError, match="2-D"):
        mm(torch.randn(5), cu_of([5], CPU))
    with pytest.raises(TypeError, match="hidden"):
        mm(h.long(), cu_of([5], CPU))
    with pytest.raises(TypeError, match="float64"), embedkit.use_backend("native"):
        mm(h.double(), cu_of([5], CPU))
    with embedkit.use_backend("reference"):
        assert mm(h.double(), cu_of([5], CPU)).dtype == torch.float64
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        _native.masked_mean(h.double(), cu_of([5], CPU), None)
    with pytest.raises(ValueError, match="unit column stride"):
        _native.masked_mean(h.t().contiguous().t(), cu_of([5], CPU), None)


# ---- the libraries: loading, unavailability, the CUDA compile --------------------------------------

def test_missing_library_disables_only_the_native_backend(tmp_path, monkeypatch):
    monkeypatch.setenv(_native.ENV_DIR, str(tmp_path))
    _native.reload()
    try:
        why = _native.problem("masked_mean", CPU)
        assert why is not None and "embedkit build" in why and str(tmp_path) in why
        assert "native" not in embedkit.available_backends("pack")
        with pytest.raises(BackendUnavailableError, match="embedkit build"), embedkit.use_backend("native"):
            embedkit.sequence_fingerprint(torch.arange(3), cu_of([3], CPU))
        with embedkit.use_backend("auto"):  # auto runs the reference instead
            assert torch.equal(embedkit.sequence_fingerprint(torch.arange(3), cu_of([3], CPU)),
                               reference.sequence_fingerprint(torch.arange(3), cu_of([3], CPU)))
        (tmp_path / "libembedkit_cpu.so").write_bytes(b"not a library")
        _native.reload()
        assert "cannot be loaded" in _native.problem("pack", CPU)
    finally:
        monkeypatch.undo()
        _native.reload()
    assert _native.problem("pack", CPU) is None
    assert "no frobnicate" in _native.problem("frobnicate", CPU)


def _declared_functions(kind: str | None = None) -> list[str]:
    """Functions of embedkit.h; with kind ("cpu" / "cuda"), those that library must export."""
    header = (_build.repo_root() / "csrc" / "include" / "embedkit.h").read_text()
    names = re.findall(r"EK_API [^;(]*?\b(ek_\w+)\(", header)
    if kind is None:
        return names
    other = "cuda" if kind == "cpu" else "cpu"
    return [n for n in names if not n.endswith("_" + other) and not n.startswith(f"ek_{other}_")]


def test_header_declares_a_cpu_twin_for_every_cuda_function():
    names = _declared_functions()
    cuda = [n for n in names if n.endswith("_cuda")]
    assert len(cuda) == 3 and all(n[:-5] + "_cpu" in names for n in cuda)
    lib = ctypes.CDLL(str(_native.library_path("cpu")))
    for name in _declared_functions("cpu"):
        assert hasattr(lib, name), name


def test_cuda_library_compiles(tmp_path):
    """libembedkit_cuda compiles with nvcc for sm_90a whenever nvcc is present (CI builds it
    first with `embedkit build --cuda --arch 90a`; this compiles it here if that artifact is
    missing or stale) and exports every CUDA function of the header."""
    if _build.find_nvcc() is None:
        pytest.skip("nvcc is not installed: the CUDA library cannot be compiled here")
    lib_path = _native.library_path("cuda")
    if _build.is_stale(lib_path):
        built = _build.build(cuda=True, arch="90a", build_dir=tmp_path / "build", lib_dir=tmp_path / "lib")
        lib_path = built[-1]
        _native.reload()
    assert lib_path.exists()
    lib = ctypes.CDLL(str(lib_path))  # loads without a GPU (static cudart, lazy driver)
    for name in _declared_functions("cuda"):
        assert hasattr(lib, name), name
    assert lib.ek_abi_version() == _native.ABI_VERSION


def test_native_ops_trace_with_torch_compile():
    """The fake implementations let torch.compile trace the native ops in one graph."""
    cu = cu_of([3, 2, 3], CPU)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)

    def step(hidden, ids, padded):
        fp = embedkit.sequence_fingerprint(ids, cu)
        packed = embedkit.ops.pack(padded, cu, mask, total_tokens=8)
        return embedkit.masked_mean(hidden + packed, cu), fp

    hidden, ids, padded = torch.randn(8, 5), torch.arange(8), torch.randn(3, 4, 5)
    embedkit.set_validation(False)  # the sync checks are skipped under compile anyway
    with embedkit.use_backend("native"):
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        x1, p1 = leaf(hidden), leaf(padded)
        out, fp = compiled(x1, ids, p1)
        x2, p2 = leaf(hidden), leaf(padded)
        ref_out, ref_fp = step(x2, ids, p2)
    assert torch.equal(out, ref_out) and torch.equal(fp, ref_fp)
    out.sum().backward()
    ref_out.sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(p1.grad, p2.grad)


@pytest.mark.parametrize("backend", [b for b in ("triton", "native") if b in embedkit.available_backends("masked_mean")])
def test_masked_mean_with_pool_mask_compiles_to_the_eager_values(backend):
    """Compiled == eager with a pool mask and cu_seqlens captured from the enclosing scope (tensors made
    contiguous outside the custom op once changed what the compiled graph computed)."""
    torch.manual_seed(0)
    hidden = torch.randn(15, 8)
    cu = cu_of([4, 9, 2], CPU)
    pool_mask = torch.rand(15) > 0.3
    pool_mask[[0, 4, 13]] = True
    with embedkit.use_backend(backend):
        eager = embedkit.masked_mean(hidden, cu, pool_mask)
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: embedkit.masked_mean(x, cu, pool_mask), fullgraph=True,
                                 backend="aot_eager")(hidden)
    assert torch.equal(compiled, eager)
