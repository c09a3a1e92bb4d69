"""nce_loss: the tiled Triton kernel against the naive torch loss (materialized [B, B] logits +
cross_entropy, one separate loss per MRL level), a chunked torch loss (embedkit's reference: row
chunks under activation checkpointing) and the inf-cl package (when installed).

Reported per case: forward+backward time, FLOP rate of the 8 * B^2 * D convention (forward 2 B^2 D,
backward recompute 2 B^2 D + two gradient matmuls 4 B^2 D) and its fraction of the matmul rate measured
in the same run, peak memory above the inputs (and the "extra" memory beyond the inputs' gradients),
and on embedkit's rows (triton, reference) speedup_vs_<baseline> over the naive loss, the chunked torch
loss and inf-cl (bench/harness.py's definition: the baseline's time / embedkit's, same case, same run),
and the cost of 3 MRL levels over 1 level for every implementation.

Also measured in the same run: torch.matmul at the backward's own GEMM shape (one coefficient block
against its candidates: [ROW_CHUNK, CAND_CHUNK] x [CAND_CHUNK, D]) and the fraction of the 8 B^2 D floor
at that rate (frac_of_floor_gemm), beside the harness's square-matmul floor (frac_of_floor).

`python -m bench.bench_nce [--quick] [--largest] [--chunks 2048x2048,4096x2048] [--out DIR]`: --largest
also finds the largest batch whose fwd+bwd runs at D=3072 (the goal: >= 1M rows); --chunks runs the
triton rows once per backward chunk size (rows x candidates). On CPU everything runs at tiny sizes (the
triton rows only under TRITON_INTERPRET=1), so CI can smoke it.

Floors: FLOPs 8 B^2 D (whatever the number of MRL levels: nested prefixes cost one full-width product);
bytes: q and t read in the forward, read again and their gradients written in the backward
(6 B D elements). At these sizes the FLOP floor dominates.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import embedkit

from .harness import BenchRun

OP = "nce_loss"
# The torch losses embedkit's rows are compared with (speedup_vs_<baseline>); the rest are embedkit's.
BASELINES = ("torch-naive", "torch-chunked", "inf-cl")
TEMPERATURE = 0.05


def _levels(D: int, n: int) -> tuple[int, ...] | None:
    if n == 1:
        return None
    return (D // 4, D // 2, D) if D >= 3072 else tuple(D * (i + 1) // n for i in range(n))


def _naive(q, t, dims):
    """What a user writes: per level, normalize, materialize the logits, cross_entropy."""
    labels = torch.arange(q.shape[0], device=q.device)
    loss = 0.0
    for d in dims or (q.shape[1],):
        logits = F.normalize(q[:, :d], dim=-1) @ F.normalize(t[:, :d], dim=-1).t() / TEMPERATURE
        loss = loss + F.cross_entropy(logits.float(), labels)
    return loss


def _inf_cl():
    try:
        from inf_cl import cal_inf_loss  # noqa: F401
    except Exception as exc:  # not installed (or no CUDA build): say so in the record
        return None, repr(exc)
    return cal_inf_loss, None


def _inf_cl_loss(fn, q, t, dims):
    loss = 0.0
    for d in dims or (q.shape[1],):
        loss = loss + fn(F.normalize(q[:, :d], dim=-1), F.normalize(t[:, :d], dim=-1), scale=1.0 / TEMPERATURE)
    return loss


def _naive_bytes(B: int, D: int, levels: int, elem: int) -> int:
    # per level alive until backward: low-precision logits, fp32 copy, softmax/grad buffers
    return levels * B * B * (elem + 4 + 4) + 4 * B * D * elem


def _kernels():
    from embedkit._triton import nce as kernels

    return kernels


def gemm_rate(bench: BenchRun, D: int, dtype, row_chunk: int, cand_chunk: int) -> float:
    """TFLOP/s of torch.matmul at the backward's block shape, [row_chunk, cand_chunk] x [cand_chunk, D]."""
    a = torch.randn(row_chunk, cand_chunk, device=bench.device, dtype=dtype)
    b = torch.randn(cand_chunk, D, device=bench.device, dtype=dtype)
    ms = bench.time_ms(lambda: torch.mm(a, b))
    return 2.0 * row_chunk * cand_chunk * D / (ms * 1e-3) / 1e12


def run(bench: BenchRun, *, batches: list[int] | None = None, dims: list[int] | None = None,
        chunks: list[tuple[int, int]] | None = None) -> None:
    """batches / dims narrow the GPU cases (bench/gpu_check.py runs the headline ones); chunks: backward
    block sizes (rows, candidates) for the triton rows (default: the kernels' ROW_CHUNK x CAND_CHUNK)."""
    K = _kernels()
    saved = (K.ROW_CHUNK, K.CAND_CHUNK)
    try:
        _run(bench, batches, dims, chunks)
    finally:
        K.ROW_CHUNK, K.CAND_CHUNK = saved


def _run(bench: BenchRun, batches, dims, chunks) -> None:
    from embedkit._triton import INTERPRET

    dev = bench.device
    gpu_batches, gpu_dims = batches, dims
    if bench.on_gpu:
        dtype = torch.bfloat16
        batches = [4096, 16384] if bench.quick else [4096, 16384, 65536, 262144]
        dims = [768, 3072]
        impls = ["triton", "torch-naive", "torch-chunked", "inf-cl"]
        free = torch.cuda.mem_get_info(dev)[0]
    else:
        dtype = torch.float32
        batches = [512] if bench.quick else [1024, 2048]
        dims = [256]
        impls = ["reference", "torch-naive"]
        free = None
        if INTERPRET:  # the Triton kernels interpreted: a smoke test of the same code path, tiny shapes
            impls = ["triton"] + impls
            batches, dims = [32], [16]
        bench.note("nce_loss on CPU: the tiled reference (chunked torch) and the naive loss (and the interpreted "
                   "Triton kernels under TRITON_INTERPRET=1, tiny shapes); the Triton kernel's time and "
                   "memory, and the H100 targets, need a GPU")
    K = _kernels()
    chunk_list = chunks or [(K.ROW_CHUNK, K.CAND_CHUNK)]
    if bench.on_gpu:
        batches, dims = gpu_batches or batches, gpu_dims or dims
    inf_fn, inf_err = _inf_cl() if "inf-cl" in impls else (None, None)
    if "inf-cl" in impls and inf_fn is None:
        bench.note(f"inf-cl is not installed or does not import ({inf_err}): not measured")
    gen = torch.Generator().manual_seed(0)
    elem = torch.empty(0, dtype=dtype).element_size()
    for D in dims:
        for B in batches:
            if bench.out_of_time(f"nce_loss B={B} D={D}"):
                return
            q0 = torch.randn(B, D, generator=gen).to(dev, dtype)
            t0 = (q0.float() + torch.randn(B, D, generator=gen).to(dev)).to(dtype)
            q = q0.requires_grad_()
            t = t0.requires_grad_()
            grads_bytes = 2 * B * D * elem
            rates = {c: gemm_rate(bench, D, dtype, min(c[0], B), min(c[1], B)) for c in chunk_list}
            for (rc, cc), rate in rates.items():
                bench.note(f"torch.matmul [{min(rc, B)}, {min(cc, B)}] x [{min(cc, B)}, {D}] {str(dtype)[6:]}: "
                           f"{rate:.1f} TFLOP/s (the backward's block GEMM; the 8 B^2 D floor at this rate is "
                           f"{8.0 * B * B * D / (rate * 1e12) * 1e3:.2f} ms at B={B})")
            per_impl: dict[str, dict[int, float]] = {}
            for levels in (1, 3):
                mrl = _levels(D, levels)
                case = {"B": B, "D": D, "levels": levels, "dtype": str(dtype)[6:]}
                runs = [(impl, c) for impl in impls for c in (chunk_list if impl == "triton" else [None])]
                for impl, chunk in runs:
                    if chunk is not None:
                        K.ROW_CHUNK, K.CAND_CHUNK = chunk
                    if impl == "torch-naive" and free is not None and _naive_bytes(B, D, levels, elem) > 0.8 * free:
                        bench.note(f"torch-naive skipped at B={B} D={D} levels={levels}: needs about "
                                   f"{_naive_bytes(B, D, levels, elem) / 2**30:.0f} GiB (the [B, B] logits)")
                        continue
                    if impl == "torch-chunked" and B > 65536:
                        bench.note(f"torch-chunked skipped at B={B}: minutes per call")
                        continue
                    if impl == "inf-cl" and inf_fn is None:
                        continue

                    if impl in ("triton", "reference", "torch-chunked"):
                        backend = "reference" if impl == "torch-chunked" else impl

                        def loss_fn(backend=backend, mrl=mrl):
                            with embedkit.use_backend(backend):
                                return embedkit.nce_loss(q, t, temperature=TEMPERATURE, mrl_dims=mrl)
                    elif impl == "torch-naive":
                        def loss_fn(mrl=mrl):
                            return _naive(q, t, mrl)
                    else:
                        def loss_fn(mrl=mrl):
                            return _inf_cl_loss(inf_fn, q, t, mrl)

                    def fwd_bwd(loss_fn=loss_fn):
                        loss_fn().backward()
                        q.grad = t.grad = None

                    try:
                        # Interpreted kernels run seconds per call: one warm-up, two timed calls.
                        ms = bench.time_ms(fwd_bwd, **(dict(warmup=1, rep=2) if INTERPRET else {}))
                        peak = bench.peak_memory_bytes(fwd_bwd)
                    except (torch.cuda.OutOfMemoryError, MemoryError):
                        torch.cuda.empty_cache()
                        bench.note(f"{impl} ran out of memory at B={B} D={D} levels={levels}")
                        continue
                    extra = {}
                    if peak is not None:
                        extra = {"peak_mb": peak / 2**20, "extra_mb": max(0, peak - grads_bytes) / 2**20}
                    name = impl if chunk is None or len(chunk_list) == 1 else f"{impl} chunks {chunk[0]}x{chunk[1]}"
                    per_impl.setdefault(name, {})[levels] = ms
                    rate = rates[chunk or chunk_list[0]]
                    if chunk is not None:
                        extra["chunks"] = f"{chunk[0]}x{chunk[1]}"
                    bench.record(OP, case, name, ms=ms, flops=8.0 * B * B * D, floor_bytes=6.0 * B * D * elem,
                                 gemm_tflops=rate, frac_of_floor_gemm=8.0 * B * B * D / (rate * 1e12) / (ms * 1e-3),
                                 **extra)
                bench.add_speedups(OP, case, baselines=BASELINES)
            for impl, by_levels in per_impl.items():
                if 1 in by_levels and 3 in by_levels:
                    ratio = by_levels[3] / by_levels[1]
                    for rec in bench.records:
                        if rec["op"] == OP and rec["impl"] == impl and rec["case"]["B"] == B and \
                                rec["case"]["D"] == D and rec["case"]["levels"] == 3:
                            rec["levels3_over_1"] = ratio
                    bench.note(f"{impl} B={B} D={D}: 3 MRL levels cost {ratio:.2f}x one level")
            q = t = q0 = t0 = None  # free the inputs; not del: the closures above read it
            if bench.on_gpu:
                torch.cuda.empty_cache()
    if bench.on_gpu:
        bench.note("targets (issue 13; H100/H200, B=65536, D=3072, bf16, fwd+bwd): extra_mb <= 512; "
                   "frac_of_floor >= 1/1.4 = 0.71 (8 B^2 D at the matmul rate measured in this run; "
                   "frac_of_floor_gemm: at the backward's block-GEMM rate); "
                   "levels3_over_1 <= 1.15 for triton; the largest batch that runs >= 1M rows at D=3072")


def largest_batch(bench: BenchRun, D: int = 3072, start: int = 65536, limit: int = 1 << 22) -> int | None:
    """The largest B (doubling from `start`) whose fwd+bwd runs on this device, one call each; the goal
    is >= 1M rows at D=3072. Recorded as one row with the time of the largest call that ran."""
    dev = bench.device
    dtype = torch.bfloat16 if bench.on_gpu else torch.float32
    backend = "triton" if bench.on_gpu else "reference"
    if not bench.on_gpu:
        start, limit = min(start, 256), min(limit, 1024)
    best = None
    B = start
    while B <= limit and not bench.out_of_time(f"nce_loss largest batch B={B} D={D}"):
        try:
            q = torch.randn(B, D, device=dev, dtype=dtype, requires_grad=True)
            t = torch.randn(B, D, device=dev, dtype=dtype, requires_grad=True)
            if bench.on_gpu:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            with embedkit.use_backend(backend):
                embedkit.nce_loss(q, t, temperature=TEMPERATURE).backward()
            if bench.on_gpu:
                torch.cuda.synchronize(dev)
            best = (B, (time.perf_counter() - t0) * 1e3)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            bench.note(f"nce_loss largest batch: B={B} D={D} failed ({type(exc).__name__}); stopping")
            break
        finally:
            q = t = None
            if bench.on_gpu:
                torch.cuda.empty_cache()
        B *= 2
    if best is None:
        return None
    B, ms = best
    elem = torch.empty(0, dtype=dtype).element_size()
    bench.record(OP, {"B": B, "D": D, "levels": 1, "dtype": str(dtype)[6:], "pass": "largest batch"},
                 backend,
                 ms=ms, flops=8.0 * B * B * D, floor_bytes=6.0 * B * D * elem, largest_batch=B)
    return B


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--largest", action="store_true", help="also find the largest batch that runs at D=3072")
    ap.add_argument("--largest-only", action="store_true", help="only the largest-batch search")
    ap.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=None)
    ap.add_argument("--dims", type=lambda v: [int(x) for x in v.split(",")], default=None)
    ap.add_argument("--chunks", type=lambda v: [tuple(int(n) for n in c.split("x")) for c in v.split(",")],
                    default=None, help="backward block sizes, rows x candidates, e.g. 2048x2048,4096x2048")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bench = BenchRun(None, quick=args.quick, out_dir=args.out)
    r = bench.rooflines
    print(f"matmul {r['matmul_tflops']:.2f} TFLOP/s ({r['matmul_dtype']}), copy {r['copy_gbps']:.1f} GB/s")
    if not args.largest_only:
        run(bench, batches=args.batches, dims=args.dims, chunks=args.chunks)
    if args.largest or args.largest_only:
        print(f"largest batch: {largest_batch(bench)}")
    for p in bench.save("nce_loss"):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
