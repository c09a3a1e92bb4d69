"""The native (csrc) kernels: pack / unpack, sequence_fingerprint and masked_mean throughput.

Against: the torch composition for pack (nonzero + index_select) and unpack (nonzero + new_full +
index_copy), the pure-torch reference for fingerprint and masked mean, and on GPU the Triton
masked-mean kernel (pool_project's pooling half). GB/s counts the bytes each op must move:
pack / unpack read and write the token rows (plus the padding writes of unpack and the mask);
fingerprint and masked mean read their input once. Timed with input validation off (the checks
that need a device sync are a separate, optional cost). The native (and Triton) rows carry
speedup_vs_<baseline> over the torch composition or the reference, same case (bench/harness.py).
"""
from __future__ import annotations

import torch

import embedkit

from .harness import BenchRun


def _mask(batch: int, length: int, fill: float, gen: torch.Generator, device) -> torch.Tensor:
    """Left/right-padded rows holding about `fill` * length tokens (at least one)."""
    lengths = (torch.rand(batch, generator=gen) * 2 * fill * length).clamp(1, length).long()
    pos = torch.arange(length)[None, :]
    right = pos < lengths[:, None]
    left = pos >= length - lengths[:, None]
    flip = (torch.arange(batch) % 2 == 1)[:, None]
    return torch.where(flip, left, right).to(device)


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def _native_ok(bench: BenchRun, op: str) -> bool:
    if "native" in embedkit.available_backends(op) and embedkit.ops._native.problem(op, bench.device) is None:
        return True
    bench.note(f"native {op} unavailable on {bench.device.type}: "
               f"{embedkit.ops._native.problem(op, bench.device)}")
    return False


def _bench_pack(bench: BenchRun, sizes, dtype, gen) -> None:
    dev = bench.device
    have_native = _native_ok(bench, "pack")
    for batch, length, width in sizes:
        mask = _mask(batch, length, 0.6, gen, dev)
        cu = _cu(mask.sum(1).int())
        total = int(cu[-1])
        padded = torch.randn(batch, length, width, device=dev).to(dtype)
        row = width * padded.element_size()
        case = {"B": batch, "L": length, "H": width, "T": total, "dtype": str(dtype)[6:]}

        def torch_pack():
            idx = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
            return padded.reshape(batch * length, width).index_select(0, idx)

        packed = torch_pack()

        def torch_unpack():
            idx = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
            out = packed.new_zeros(batch * length, width)
            return out.index_copy(0, idx, packed).view(batch, length, width)

        impls = {"torch nonzero+index_select": (torch_pack, torch_unpack)}
        if have_native:
            def native_pack():
                with embedkit.use_backend("native"):
                    return embedkit.ops.pack(padded, cu, mask, total_tokens=total)

            def native_unpack():
                with embedkit.use_backend("native"):
                    return embedkit.ops.unpack(packed, cu, length, attention_mask=mask)

            impls = {"native": (native_pack, native_unpack), **impls}
        for impl, (fn_pack, fn_unpack) in impls.items():
            for op, fn, moved in (("pack", fn_pack, 2 * total * row + mask.numel()),
                                  ("unpack", fn_unpack, (total + batch * length) * row + mask.numel())):
                bench.record(op, case, impl, ms=bench.time_ms(fn), bytes_moved=moved)
        for op in ("pack", "unpack"):
            bench.add_speedups(op, case, baselines=["torch nonzero+index_select"])


def _bench_fingerprint(bench: BenchRun, sizes, gen) -> None:
    dev = bench.device
    have_native = _native_ok(bench, "sequence_fingerprint")
    for total, mean_len, width, dtype in sizes:
        lengths = torch.randint(max(1, mean_len // 2), 2 * mean_len, (total // mean_len,), generator=gen)
        cu = _cu(lengths.to(dev).int())
        t = int(cu[-1])
        shape = (t,) if width == 1 else (t, width)
        values = (torch.randint(0, 50000, shape, generator=gen) if dtype == torch.int64
                  else torch.randn(shape, generator=gen)).to(dtype).to(dev)
        case = {"T": t, "B": lengths.numel(), "row": "token id" if width == 1 else f"[{width}]",
                "dtype": str(dtype)[6:]}
        moved = values.numel() * values.element_size()
        impls = {"reference": "reference"}
        if have_native:
            impls = {"native": "native", **impls}
        for impl, backend in impls.items():
            def fn(backend=backend):
                with embedkit.use_backend(backend):
                    return embedkit.sequence_fingerprint(values, cu)
            bench.record("sequence_fingerprint", case, impl, ms=bench.time_ms(fn), bytes_moved=moved)
        bench.add_speedups("sequence_fingerprint", case, baselines=["reference"])


def _bench_masked_mean(bench: BenchRun, sizes, dtype, gen) -> None:
    dev = bench.device
    impls = []
    if _native_ok(bench, "masked_mean"):
        impls.append("native")
    if bench.on_gpu:
        impls.append("triton")
    impls.append("reference")
    for total, width in sizes:
        lengths = torch.randint(32, 224, (total // 128,), generator=gen)
        cu = _cu(lengths.to(dev).int())
        t = int(cu[-1])
        hidden = torch.randn(t, width, device=dev).to(dtype)
        case = {"T": t, "H": width, "B": lengths.numel(), "dtype": str(dtype)[6:]}
        for impl in impls:
            def fn(impl=impl):
                with embedkit.use_backend(impl):
                    return embedkit.masked_mean(hidden, cu)
            bench.record("masked_mean", case, impl, ms=bench.time_ms(fn), bytes_moved=t * width * hidden.element_size())
        bench.add_speedups("masked_mean", case, baselines=["reference"])


OPS = ("pack", "unpack", "sequence_fingerprint", "masked_mean")


def run(bench: BenchRun, *, ops: list[str] | None = None) -> None:
    """ops: which of OPS to measure (default all; pack and unpack are measured together)."""
    ops = list(OPS) if ops is None else ops
    gen = torch.Generator().manual_seed(0)
    previous = embedkit.validation_enabled()
    embedkit.set_validation(False)
    try:
        if bench.on_gpu:
            dtype = torch.bfloat16
            pack_sizes = [(64, 512, 1024), (16, 4096, 4096)] if bench.quick else \
                [(64, 512, 1024), (256, 512, 4096), (16, 4096, 4096), (1024, 512, 1)]
            fp_sizes = [(1 << 20, 128, 1, torch.int64)] if bench.quick else \
                [(1 << 20, 128, 1, torch.int64), (1 << 22, 512, 1, torch.int64), (1 << 18, 128, 1024, torch.bfloat16)]
            mean_sizes = [(16384, 1024), (262144, 4096)] if bench.quick else \
                [(16384, 1024), (16384, 4096), (262144, 1024), (262144, 4096)]
        else:
            dtype = torch.float32
            pack_sizes = [(16, 256, 256)] if bench.quick else [(16, 256, 256), (64, 512, 1024), (256, 512, 1)]
            fp_sizes = [(1 << 16, 128, 1, torch.int64)] if bench.quick else \
                [(1 << 18, 128, 1, torch.int64), (1 << 14, 128, 256, torch.float32)]
            mean_sizes = [(4096, 256)] if bench.quick else [(4096, 256), (16384, 1024)]
        if "pack" in ops or "unpack" in ops:
            _bench_pack(bench, pack_sizes, dtype, gen)
        if "sequence_fingerprint" in ops:
            _bench_fingerprint(bench, fp_sizes, gen)
        if "masked_mean" in ops:
            _bench_masked_mean(bench, mean_sizes, dtype, gen)
    finally:
        embedkit.set_validation(previous)
