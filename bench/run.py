"""Runs the op benchmarks through one BenchRun and saves the results (`embedkit bench`)."""
from __future__ import annotations

import importlib
from pathlib import Path

from .harness import BenchRun, default_results_root, machine_name

# benchmark name -> module with `run(bench: BenchRun) -> None` (the records' "op" field is the name,
# except bench_native's, which records each of its ops by its own name)
BENCHMARKS = {
    "pool_project": "bench.bench_pool_project",
    "embedder": "bench.bench_embedder",
    "encode": "bench.bench_encode",
    "native": "bench.bench_native",
    "attention": "bench.bench_attention",
    "nce_loss": "bench.bench_nce",
}
# Each op of the registry (embedkit.ops._dispatch.registered_ops()) -> the benchmark that measures it, so
# `embedkit bench --op NAME` takes the op names `embedkit info` lists, besides the benchmark names.
OP_BENCHMARKS = {
    "varlen_attention": "attention",
    "pool_project": "pool_project",
    "nce_loss": "nce_loss",
    "masked_mean": "native",
    "pack": "native",
    "unpack": "native",
    "sequence_fingerprint": "native",
}


def choices() -> list[str]:
    """Every name --op accepts: the registry's op names and the benchmark names."""
    return sorted(set(OP_BENCHMARKS) | set(BENCHMARKS))


def plan(names: list[str] | None) -> dict[str, list[str] | None]:
    """--op names -> {benchmark: the native ops to measure, or None (all of it)}, in first-named order."""
    if not names:
        return dict.fromkeys(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS and n not in OP_BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown --op {unknown}; choose from {choices()}")
    out: dict[str, list[str] | None] = {}
    for n in names:
        bench = n if n in BENCHMARKS else OP_BENCHMARKS[n]
        if n in BENCHMARKS or bench != "native":  # the whole benchmark
            out[bench] = None
        elif bench not in out or out[bench] is not None:  # one native op: add it to the native ones named
            out[bench] = (out.get(bench) or []) + [n]
    return out


def main(*, quick: bool = False, ops: list[str] | None = None, out_dir: str | None = None,
         device: str | None = None, save_to: str | None = None) -> list:
    """out_dir: the exact folder for this run's files. save_to: a results root (e.g. bench/results, to
    commit them) under which the machine's folder is used. Neither: ~/.cache/embedkit/bench/<machine>/
    (outside the git tree; $EMBEDKIT_BENCH_DIR overrides the root)."""
    try:
        todo = plan(ops)
    except ValueError as err:
        raise SystemExit(str(err)) from None
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
    for name, native_ops in todo.items():
        module = importlib.import_module(BENCHMARKS[name])
        if native_ops is None:
            module.run(bench)
        else:
            module.run(bench, ops=native_ops)
    paths = bench.save("-".join(ops) if ops else "all")
    for p in paths:
        print(f"wrote {p}")
    if not bench.reliable:
        print("UNRELIABLE RUN: " + "; ".join(bench.unreliable))
    return paths
