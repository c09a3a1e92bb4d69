"""Runs the op benchmarks through one BenchRun and saves the results (`embedkit bench`)."""
from __future__ import annotations

import importlib
from pathlib import Path

from .harness import BenchRun, default_results_root, machine_name

# op name -> module with `run(bench: BenchRun) -> None`
BENCHMARKS = {
    "pool_project": "bench.bench_pool_project",
    "embedder": "bench.bench_embedder",
    "encode": "bench.bench_encode",
    "native": "bench.bench_native",
    "attention": "bench.bench_attention",
    "nce_loss": "bench.bench_nce",
}


def main(*, quick: bool = False, ops: list[str] | None = None, out_dir: str | None = None,
         device: str | None = None, save_to: str | None = None) -> list:
    """out_dir: the exact folder for this run's files. save_to: a results root (e.g. bench/results, to
    commit them) under which the machine's folder is used. Neither: ~/.cache/embedkit/bench/<machine>/
    (outside the git tree; $EMBEDKIT_BENCH_DIR overrides the root)."""
    names = ops or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown --op {unknown}; choose from {sorted(BENCHMARKS)}")
    if out_dir is not None and save_to is not None:
        raise SystemExit("give --out (the exact folder) or --save-to (a results root), not both")
    if save_to is not None:
        import torch

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        out_dir = str(Path(save_to) / machine_name(dev))
    bench = BenchRun(device, quick=quick, out_dir=out_dir)
    print(f"results folder: {bench.out_dir}" + ("" if out_dir else
          f" (outside the git tree; `--save-to bench/results` to commit; default root {default_results_root()})"))
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
    if not bench.reliable:
        print("UNRELIABLE RUN: " + "; ".join(bench.unreliable))
    return paths
