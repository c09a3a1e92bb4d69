"""One command that turns a lent GPU into committed numbers: `bash bench/gpu_check.sh [--budget S]`.

GPUs reach this project rarely and for minutes, so the check spends its time in order of value and
stops itself before its budget, recording what it skipped:
  1. build the CUDA library (`embedkit build --cuda`),
  2. the gpu-marked tests and the kernel tests on CUDA (bf16 under the tolerance rule),
  3. the headline benchmarks, each with its competitors in the same run: nce_loss B=65,536 D=3,072 at
     1 and 3 MRL levels; attention mixes a and b, D 64 / 128, Hkv 16 and 4 (GQA 4), with embedkit's
     atomic backward and full / partial rotary beside its default at mix b D 128; pool_project
     T=256K H=4096; MiniLM encode against sentence-transformers; then the largest NCE batch.
Everything lands in bench/results/<gpu>/ (the BenchRun's JSON + Markdown + PNG, and gpu_check.json
with every step's status, time and output tail) and is copied to $OUT when that is set.

`--dry-run` runs the same steps on the CPU at tiny sizes (no build, the gpu-marked tests only
collected and skipped), so CI proves that the script starts, parses and writes its files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Kernel test files run on CUDA (their interpreter-sized cases plus the gpu-marked bf16 ones).
KERNEL_TESTS = ["tests/test_attention.py", "tests/test_attention_kernels.py", "tests/test_nce.py",
                "tests/test_nce_temperatures.py", "tests/test_pool_project.py", "tests/test_native.py",
                "tests/test_safety_memory.py"]


class Steps:
    """Runs steps against one deadline; each step is recorded as ok / failed / skipped."""

    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.log: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, need_s: float, fn) -> bool:
        if self.left() < need_s:
            self.log.append({"step": name, "status": "skipped", "why": f"{self.left():.0f} s left, needs ~{need_s:.0f} s"})
            print(f"gpu_check: skipped {name} ({self.left():.0f} s left, needs ~{need_s:.0f} s)", flush=True)
            return False
        print(f"gpu_check: {name} ({self.left():.0f} s left)", flush=True)
        start = time.monotonic()
        try:
            detail = fn() or {}
            status = detail.pop("status", "ok")
        except Exception as exc:  # one failed step must not cost the rest of the lease
            status, detail = "failed", {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        self.log.append({"step": name, "status": status, "seconds": round(time.monotonic() - start, 1), **detail})
        print(f"gpu_check: {name}: {status} in {time.monotonic() - start:.0f} s", flush=True)
        return status == "ok"


def _command(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"status": "failed", "why": f"timed out after {timeout:.0f} s", "tail": out[-3000:]}
    out = proc.stdout + proc.stderr
    # pytest's exit code 5 = nothing selected (e.g. no gpu-marked test in a file): not a failure
    ok = proc.returncode == 0 or (proc.returncode == 5 and "pytest" in " ".join(cmd))
    sys.stdout.write(out[-4000:])
    return {"status": "ok" if ok else "failed", "rc": proc.returncode, "cmd": " ".join(cmd), "tail": out[-3000:]}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: proves the script runs and writes")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<machine>/)")
    args = ap.parse_args(argv)

    import torch

    steps = Steps(args.budget)
    py = sys.executable
    env = _env()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"

    if args.dry_run:
        steps.run("build (dry run: embedkit info only)", 5, lambda: _command([py, "-m", "embedkit.cli", "info"], 60, env))
        steps.run("gpu-marked tests (dry run: collected and skipped)", 10, lambda: _command(
            [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_native.py"], steps.left(), env))
    else:
        steps.run("build the CUDA library", 20, lambda: _command([py, "-m", "embedkit.cli", "build", "--cuda"], 240, env))
        steps.run("gpu-marked tests", 30, lambda: _command(
            [py, "-m", "pytest", "-q", "-x", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
            min(150, steps.left() - 200), env))
        steps.run("kernel tests on CUDA", 60, lambda: _command(
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS], min(120, steps.left() - 180), env))

    sys.path.insert(0, str(ROOT))
    from bench import bench_attention, bench_encode, bench_nce, bench_pool_project
    from bench.harness import RESULTS_DIR, BenchRun, machine_name

    # Unlike `embedkit bench` (which writes outside the tree unless --save-to), the GPU check's whole
    # point is committed numbers: its default folder is bench/results/<machine>/.
    out_dir = args.out or str(RESULTS_DIR / machine_name(torch.device(device)))
    bench = BenchRun(device, quick=args.dry_run, out_dir=out_dir)
    bench.deadline = steps.deadline - 15  # leave time to write the files
    bench.note("bench/gpu_check: headline cases" + (" (dry run: CPU, tiny sizes)" if args.dry_run else ""))
    steps.run("bench nce_loss B=65536 D=3072, 1 and 3 levels", 30,
              lambda: bench_nce.run(bench, batches=[65536], dims=[3072]))
    steps.run("bench attention mixes a, b; D 64/128; Hkv 16/4", 60,
              lambda: bench_attention.run(bench, mixes=["a", "b"], head_dims=[64, 128], variant_cases=[("b", 128)]))
    steps.run("bench pool_project T=256K H=4096", 15,
              lambda: bench_pool_project.run(bench, sizes=[(262144, 4096)]))
    steps.run("bench encode MiniLM vs sentence-transformers", 40 if not args.dry_run else 20,
              lambda: bench_encode.run(bench, qwen=False))
    steps.run("bench nce_loss largest batch at D=3072", 30, lambda: {"largest_batch": bench_nce.largest_batch(bench)})

    paths = bench.save("gpu-check")
    summary = {"budget_s": args.budget, "dry_run": args.dry_run, "elapsed_s": round(time.monotonic() - steps.t0, 1),
               "machine": bench.machine, "steps": steps.log, "skipped_cases": bench.skipped,
               "files": [p.name for p in paths]}
    summary_path = bench.out_dir / f"{bench.started}-gpu-check-steps.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    paths.append(summary_path)
    out = os.environ.get("OUT")
    if out:  # the device tool brings back at most 8 files, 2 folders down
        dest = Path(out) / bench.out_dir.name
        dest.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy2(p, dest / p.name)
    for p in paths:
        print(f"gpu_check: wrote {p}")
    failed = [s["step"] for s in steps.log if s["status"] == "failed"]
    print(f"gpu_check: {len(steps.log) - len(failed)} steps ok or skipped, {len(failed)} failed"
          + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
