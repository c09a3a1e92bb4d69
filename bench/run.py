"""Runs the op benchmarks through one BenchRun and saves the results (`embedkit bench`)."""
from __future__ import annotations

import importlib

from .harness import BenchRun

# op name -> module with `run(bench: BenchRun) -> None`
BENCHMARKS = {
    "pool_project": "bench.bench_pool_project",
    "embedder": "bench.bench_embedder",
    "native": "bench.bench_native",
    "nce_loss": "bench.bench_nce",
}


def main(*, quick: bool = False, ops: list[str] | None = None, out_dir: str | None = None,
         device: str | None = None) -> list:
    names = ops or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown --op {unknown}; choose from {sorted(BENCHMARKS)}")
    bench = BenchRun(device, quick=quick, out_dir=out_dir)
    r = bench.rooflines
    print(f"machine: {bench.machine.get('gpu', {}).get('name') or bench.machine['cpu']}; "
          f"matmul {r['matmul_tflops']:.2f} TFLOP/s ({r['matmul_dtype']}), copy {r['copy_gbps']:.1f} GB/s")
    if not bench.on_gpu:
        bench.note("no CUDA GPU here: CPU paths only, at small sizes. The GPU figures (Triton kernels, "
                   "targets) need a GPU: run `embedkit bench` on one.")
    for name in names:
        importlib.import_module(BENCHMARKS[name]).run(bench)
    paths = bench.save("-".join(names) if ops else "all")
    for p in paths:
        print(f"wrote {p}")
    return paths
