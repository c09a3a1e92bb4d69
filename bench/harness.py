"""Benchmark harness shared by every embedkit benchmark.

A BenchRun records, for one invocation: the machine (GPU name, driver, clocks, memory and power
limit through nvidia-ml-py; CPU model otherwise), the software versions, and two rooflines
measured in the same run -- the dense matmul rate (bf16 on GPU, fp32 on CPU) and the
device-to-device copy bandwidth -- so every figure is also reported as a fraction of them. It
writes one JSON file per run, with a Markdown table and a PNG plot beside it, into a folder outside
the git tree by default (~/.cache/embedkit/bench/<machine>/, or $EMBEDKIT_BENCH_DIR/<machine>/;
`embedkit bench --save-to bench/results` to commit them), and keeps a one-page README.md summary of
every run in that folder.

Figures a reader can trust: a run checks itself. A roofline that is not positive and finite, or
that moved by more than 1.5x between the start and the end of the run, marks the run unreliable; so
does a row faster than its roofline (a fraction of bandwidth or matmul rate above 1, or a floor
above the measured time) -- typically a roofline measured while other processes held the CPU, or a
working set that fits in cache. Each such row carries `unreliable` (the reason), a warning is
printed, and the record holds the load average and this process's CPU time at the start and the end.

Speedup has one meaning in every benchmark (`speedup`, `BenchRun.add_speedups`): on an embedkit row,
`speedup_vs_<baseline>` = the named baseline's time / this row's time, the two measured in the same
case, on the same machine, in the same run (> 1: embedkit is faster than that baseline).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed results (--save-to bench/results)
# A roofline that changes by more than this factor within one run: the machine's load changed.
ROOFLINE_DRIFT = 1.5


def default_results_root() -> Path:
    """Where runs go unless asked: outside the git tree, so a benchmark never dirties the checkout."""
    env = os.environ.get("EMBEDKIT_BENCH_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "embedkit" / "bench"


def load_record() -> dict:
    """Load average (1/5/15 min), this process's CPU time and the wall clock: with cpu_count they say
    whether other work shared the machine while the figures were taken."""
    try:
        load = list(os.getloadavg())
    except (OSError, AttributeError):
        load = None
    return {"loadavg": load, "process_cpu_s": time.process_time(), "wall_s": time.perf_counter()}

# Datasheet peaks (dense bf16 tensor-core FLOP/s, HBM bytes/s). Used for the floors of a run that has no
# GPU, and labelled "datasheet" wherever they appear: they are not measurements.
DATASHEET = {
    "H100-SXM": {"matmul_tflops": 989.4, "copy_gbps": 3350.0},
    "H200": {"matmul_tflops": 989.4, "copy_gbps": 4800.0},
}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import os

    info: dict = {
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                       "sm_count": props.multi_processor_count,
                       "capability": f"{props.major}.{props.minor}"}
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            clk = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
            info["gpu"].update({
                "driver": pynvml.nvmlSystemGetDriverVersion(),
                "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, clk[0]),
                "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, clk[0]),
                "mem_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, clk[1]),
                "power_limit_w": pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0,
            })
        except Exception as exc:  # nvidia-ml-py missing or NVML unavailable: say so in the record
            info["gpu"]["nvml_error"] = repr(exc)
    return info


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return "cpu-" + _slug(_cpu_model())[:40]


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, rep: int = 10,
            min_time_s: float = 0.0) -> float:
    """Median wall time of fn() in milliseconds (CUDA-synchronized on GPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    start_all = time.perf_counter()
    while len(samples) < rep or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated during fn() above what was allocated before (CUDA only; else None)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure_rooflines(device: torch.device, quick: bool) -> dict:
    """Dense matmul TFLOP/s (bf16 on GPU, fp32 on CPU) and device-to-device copy GB/s."""
    if device.type == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, 1 << 30
    else:
        n, dtype, copy_bytes = (512 if quick else 1024), torch.float32, 1 << 26
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.mm(a, b), device)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    return {"matmul_dtype": str(dtype).replace("torch.", ""), "matmul_n": n, "matmul_ms": ms, "copy_ms": copy_ms,
            "matmul_tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12,
            "copy_bytes": copy_bytes, "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9}


def roofline_problems(r: dict) -> list[str]:
    """Why a set of measured rooflines cannot be right (empty: plausible)."""
    out = []
    for key, unit in (("matmul_tflops", "TFLOP/s"), ("copy_gbps", "GB/s")):
        v = r.get(key)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            out.append(f"roofline {key} = {v!r} {unit} is not a positive finite rate")
    return out


def row_problems(row: dict) -> list[str]:
    """Why one record is impossible against the run's rooflines (empty: plausible)."""
    out = []
    for key, what in (("frac_copy_bw", "copy bandwidth"), ("frac_matmul", "matmul rate"),
                      ("frac_of_floor", "roofline floor")):
        v = row.get(key)
        if isinstance(v, (int, float)) and v > 1.0:
            out.append(f"{key} = {v:.3g} > 1: faster than the measured {what} (roofline measured under load, "
                       f"or a cache-resident working set)")
    ms = row.get("ms")
    if not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms <= 0:
        out.append(f"ms = {ms!r} is not a positive finite time")
    return out


class BenchRun:
    """One benchmark invocation: rooflines, then records of (op, case, impl, metrics)."""

    def __init__(self, device: torch.device | str | None = None, *, quick: bool = False,
                 out_dir: Path | str | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.quick = quick
        self.out_dir = Path(out_dir) if out_dir else default_results_root() / machine_name(self.device)
        self.started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.machine = machine_info(self.device)
        self.machine["load_start"] = load_record()
        self.rooflines = measure_rooflines(self.device, quick)
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.unreliable: list[str] = []  # why this run's figures cannot be trusted (empty: no reason found)
        for why in roofline_problems(self.rooflines):
            self.flag(why)
        self.deadline: float | None = None  # time.monotonic() by which the run should stop (gpu_check)
        self.skipped: list[str] = []

    @classmethod
    def from_json(cls, path: Path | str) -> "BenchRun":
        """A saved run, loaded to re-render its Markdown with this harness (no measurement). A run saved
        before runs checked themselves gets its rows checked now (load and drift unknown: said so)."""
        path = Path(path)
        p = json.loads(path.read_text())
        run = cls.__new__(cls)
        run.device = torch.device(p["machine"].get("device", "cpu"))
        run.quick, run.out_dir, run.started = p.get("quick", False), path.parent, p["started"]
        run.machine, run.rooflines, run.records = p["machine"], p["rooflines"], p["records"]
        run.notes, run.skipped, run.deadline = list(p.get("notes", [])), list(p.get("skipped", [])), None
        run.unreliable = list(p.get("unreliable", []))
        if "reliable" not in p:
            run.notes.append("re-rendered by a later harness: rows checked against this run's rooflines now; "
                             "the load during the run was not recorded")
            for rec in run.records:
                problems = row_problems(rec)
                if problems and "unreliable" not in rec:
                    rec["unreliable"] = "; ".join(problems)
                    run.unreliable.append(f"{rec['op']} {_case_label(rec['case'])} {rec['impl']}: {problems[0]}")
        return run

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def time_ms(self, fn: Callable[[], object], **kw) -> float:
        return time_ms(fn, self.device, **kw)

    def peak_memory_bytes(self, fn: Callable[[], object]) -> int | None:
        return peak_memory_bytes(fn, self.device)

    def out_of_time(self, what: str) -> bool:
        """True (and `what` is recorded as skipped) once the run's deadline has passed."""
        if self.deadline is None or time.monotonic() < self.deadline:
            return False
        self.skipped.append(what)
        self.note(f"skipped for the time budget: {what}")
        return True

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}")

    def flag(self, why: str) -> None:
        """Mark the run unreliable (and warn) -- kept in the JSON, the Markdown and the summary."""
        if why not in self.unreliable:
            self.unreliable.append(why)
            warnings.warn(f"embedkit bench: unreliable: {why}", RuntimeWarning, stacklevel=2)

    @property
    def reliable(self) -> bool:
        return not self.unreliable

    def finish_checks(self) -> None:
        """End-of-run checks: rooflines measured again (a drift beyond ROOFLINE_DRIFT means the load
        changed during the run) and the load average / CPU time at the end."""
        if "load_end" in self.machine:
            return
        self.machine["load_end"] = end = load_record()
        start = self.machine["load_start"]
        wall = end["wall_s"] - start["wall_s"]
        cpu = end["process_cpu_s"] - start["process_cpu_s"]
        self.machine["run_wall_s"], self.machine["run_process_cpu_s"] = wall, cpu
        loads = [x for x in (start["loadavg"], end["loadavg"]) if x]
        ncpu = self.machine.get("cpu_count") or 1
        if loads and max(x[0] for x in loads) > ncpu:
            self.flag(f"load average {max(x[0] for x in loads):.2f} > {ncpu} CPUs: other work shared the machine")
        again = measure_rooflines(self.device, self.quick)
        self.rooflines["end_of_run"] = {k: again[k] for k in ("matmul_tflops", "copy_gbps")}
        for why in roofline_problems(again):
            self.flag(f"end of run: {why}")
        for key in ("matmul_tflops", "copy_gbps"):
            a, b = self.rooflines[key], again[key]
            if a > 0 and b > 0 and max(a / b, b / a) > ROOFLINE_DRIFT:
                self.flag(f"roofline {key} moved from {a:.4g} to {b:.4g} during the run (> {ROOFLINE_DRIFT}x): "
                          f"the machine's load changed")

    def record(self, op: str, case: dict, impl: str, *, ms: float, bytes_moved: float | None = None,
               flops: float | None = None, floor_flops: float | None = None, floor_bytes: float | None = None,
               **extra) -> dict:
        """Store one measurement; derives GB/s and TFLOP/s and their fractions of the rooflines.

        floor_flops / floor_bytes are the case's two floors: the FLOPs the op must do and the bytes it
        must move at the least (default: flops / bytes_moved). floor_ms is the larger of the two at this
        run's measured matmul rate and copy bandwidth, and frac_of_floor = floor_ms / ms (1.0 = at the
        roofline). The same floors at the H100 SXM and H200 datasheet peaks are recorded as
        floor_ms_<gpu>_datasheet, so a CPU run still states what the GPU floor is."""
        row = {"op": op, "case": case, "impl": impl, "ms": ms, **extra}
        if bytes_moved is not None:
            row["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
            row["frac_copy_bw"] = row["gbps"] / self.rooflines["copy_gbps"]
        if flops is not None:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
            row["frac_matmul"] = row["tflops"] / self.rooflines["matmul_tflops"]
        floor_flops = flops if floor_flops is None else floor_flops
        floor_bytes = bytes_moved if floor_bytes is None else floor_bytes
        if floor_flops is not None or floor_bytes is not None:
            row["floor_flops"], row["floor_bytes"] = floor_flops, floor_bytes
            row["floor_ms"] = floor_ms(floor_flops, floor_bytes, self.rooflines)
            row["frac_of_floor"] = row["floor_ms"] / ms if ms > 0 else None
            for gpu, peaks in DATASHEET.items():
                row[f"floor_ms_{_slug(gpu)}_datasheet"] = floor_ms(floor_flops, floor_bytes, peaks)
        problems = row_problems(row)
        if problems:
            row["unreliable"] = "; ".join(problems)
            self.flag(f"{op} {_case_label(case)} {impl}: {problems[0]}")
        self.records.append(row)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items() if k not in ("op", "case", "impl"))
        print(f"{op:16s} {_case_label(case):44s} {impl:28s} {shown}")
        return row

    def add_speedups(self, op: str, case: dict, baselines, of=None) -> None:
        """Give the rows of (op, case) named in `of` (default: every row that is not a baseline: embedkit's)
        the field speedup_vs_<baseline> = speedup(baseline's ms, the row's ms), for each baseline measured
        in this case. A baseline that was not measured (not installed, skipped, out of memory) gives no
        field, and a row records no speedup over itself."""
        rows = [rec for rec in self.records if rec["op"] == op and rec["case"] == case]
        by_impl = {rec["impl"]: rec for rec in rows}
        baselines = [b for b in baselines if b in by_impl]
        for rec in rows:
            if (rec["impl"] in baselines) if of is None else (rec["impl"] not in of):
                continue
            for b in baselines:
                value = speedup(by_impl[b]["ms"], rec["ms"]) if b != rec["impl"] else None
                if value is not None:
                    rec[speedup_column(b)] = value

    # ---- output -------------------------------------------------------------------------------
    def save(self, tag: str = "run") -> list[Path]:
        """JSON + Markdown + PNG of this run in out_dir, and out_dir/README.md (the folder's summary)
        rewritten to include it."""
        self.finish_checks()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"{self.started}-{_slug(tag)}"
        payload = {"started": self.started, "quick": self.quick, "reliable": self.reliable,
                   "unreliable": self.unreliable, "machine": self.machine,
                   "rooflines": self.rooflines, "datasheet": DATASHEET, "notes": self.notes,
                   "skipped": self.skipped, "records": self.records}
        paths = [stem.with_suffix(".json")]
        paths[0].write_text(json.dumps(payload, indent=2, default=str))
        paths.append(stem.with_suffix(".md"))
        paths[1].write_text(self.markdown())
        png = self._plot(stem.with_suffix(".png"))
        if png:
            paths.append(png)
        paths.append(write_summary(self.out_dir))
        return paths

    def markdown(self) -> str:
        m, r = self.machine, self.rooflines
        where = m.get("gpu", {}).get("name") or m["cpu"]
        lines = [f"# embedkit benchmark, {self.started}", "",
                 f"Machine: {where} ({m['device']}); torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}.",
                 f"Rooflines measured in this run: {r['matmul_dtype']} matmul {r['matmul_tflops']:.4g} TFLOP/s, "
                 f"copy {r['copy_gbps']:.4g} GB/s" + (
                     f" (at the end: {r['end_of_run']['matmul_tflops']:.4g} TFLOP/s, "
                     f"{r['end_of_run']['copy_gbps']:.4g} GB/s)." if "end_of_run" in r else "."),
                 _load_line(m), "",
                 ("**UNRELIABLE RUN** -- " + "; ".join(self.unreliable) if self.unreliable
                  else "Self-checks: no impossible value, rooflines stable over the run."), "",
                 "frac_of_floor = floor_ms / ms, where floor_ms is the larger of the case's FLOP floor at that "
                 "matmul rate and its byte floor at that copy rate; floor_ms_*_datasheet are the same floors at "
                 "datasheet peaks (not measured). speedup_vs_X = X's time / this row's time, same case, "
                 "same run (> 1: this row is faster than X). Every ratio column of the records is shown.", ""]
        lines += [f"- {n}" for n in self.notes]
        for op in dict.fromkeys(rec["op"] for rec in self.records):
            rows = [rec for rec in self.records if rec["op"] == op]
            cols = _columns(rows)
            flagged = any("unreliable" in rec for rec in rows)
            lines += ["", f"## {op}", "", "| case | impl | " + " | ".join(cols) + (" | reliable |" if flagged else " |"),
                      "|---|---|" + "---|" * (len(cols) + flagged)]
            for rec in rows:
                vals = [f"{rec[c]:.4g}" if isinstance(rec.get(c), (int, float)) else "" for c in cols]
                if flagged:
                    vals.append("**no**: " + rec["unreliable"] if "unreliable" in rec else "yes")
                lines.append(f"| {_case_label(rec['case'])} | {rec['impl']} | " + " | ".join(vals) + " |")
        return "\n".join(lines) + "\n"

    def _plot(self, path: Path) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.note("matplotlib is not installed: no PNG plot")
            return None
        ops = list(dict.fromkeys(rec["op"] for rec in self.records))
        if not ops:
            return None
        # Linear bars: each case's times relative to its slowest impl (1.0), so cases of very different
        # sizes share one honest linear axis; every bar is labelled with its measured ms. (A log axis
        # under bars makes their heights depend on where the axis starts.)
        fig, axes = plt.subplots(len(ops), 1, figsize=(13, 3.8 * len(ops)), squeeze=False)
        for ax, op in zip(axes[:, 0], ops):
            rows = [rec for rec in self.records if rec["op"] == op]
            cases = list(dict.fromkeys(_case_label(rec["case"]) for rec in rows))
            impls = list(dict.fromkeys(rec["impl"] for rec in rows))
            width = 0.8 / max(1, len(impls))
            slowest = {c: max(rec["ms"] for rec in rows if _case_label(rec["case"]) == c) for c in cases}
            for j, impl in enumerate(impls):
                xs, ys, labels = [], [], []
                for i, c in enumerate(cases):
                    hit = [rec for rec in rows if rec["impl"] == impl and _case_label(rec["case"]) == c]
                    if hit and slowest[c] > 0:
                        xs.append(i + j * width)
                        ys.append(hit[0]["ms"] / slowest[c])
                        labels.append(f"{hit[0]['ms']:.3g}" + ("?" if "unreliable" in hit[0] else ""))
                bars = ax.bar(xs, ys, width=width, label=impl)
                ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
            ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
            ax.set_ylim(0, 1.15)
            ax.set_ylabel("time / slowest impl of the case\n(linear; lower is better)")
            where = self.machine.get("gpu", {}).get("name") or self.machine["cpu"]
            flag = " -- UNRELIABLE (see the .md)" if self.unreliable else ""
            ax.set_title(f"{op} on {where}: bars labelled in ms ('?': row flagged){flag}", fontsize=9)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


SPEEDUP_PREFIX = "speedup_vs_"
_FIRST_COLUMNS = ("ms", "frac_of_floor", "floor_ms", "gbps", "frac_copy_bw", "tflops", "frac_matmul",
                  "peak_mb", "extra_mb", "speedup")  # plain "speedup": runs saved before speedup_vs_<baseline>
_HIDDEN_COLUMNS = {"floor_flops", "floor_bytes"}


def _columns(rows: list[dict]) -> list[str]:
    """Every numeric field any row carries (known ones first), so no ratio column is dropped."""
    keys = [k for rec in rows for k, v in rec.items()
            if k not in ("op", "case", "impl") and k not in _HIDDEN_COLUMNS
            and isinstance(v, (int, float)) and not isinstance(v, bool)]
    seen = list(dict.fromkeys(keys))
    first = [c for c in _FIRST_COLUMNS if c in seen] + [c for c in seen if c.startswith(SPEEDUP_PREFIX)]
    return first + [c for c in seen if c not in first]


def _load_line(m: dict) -> str:
    start, end = m.get("load_start") or {}, m.get("load_end") or {}
    parts = [f"{m.get('cpu_count')} CPUs"]
    if m.get("torch_threads"):
        parts.append(f"torch threads {m['torch_threads']}")
    if not start:
        parts.append("load not recorded (run saved before the harness recorded it)")
    if start.get("loadavg"):
        parts.append(f"load average at start {start['loadavg'][0]:.2f}")
    if end.get("loadavg"):
        parts.append(f"at end {end['loadavg'][0]:.2f}")
    if "run_wall_s" in m:
        parts.append(f"this process: {m['run_process_cpu_s']:.1f} s CPU over {m['run_wall_s']:.1f} s wall")
    return "Load: " + ", ".join(parts) + "."


def write_summary(folder: Path) -> Path:
    """folder/README.md: one page over every run saved there (newest first) -- machine, whether the
    run's self-checks passed, its Markdown table and its plot."""
    folder = Path(folder)
    runs = []
    for js in sorted(folder.glob("*.json"), reverse=True):
        try:
            payload = json.loads(js.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(payload, dict) or "records" not in payload or "machine" not in payload:
            continue  # e.g. gpu_check's steps file
        runs.append((js, payload))
    lines = [f"# Benchmark results: {folder.name}", "",
             "Written by `embedkit bench` (bench/harness.py); one row per run, newest first. "
             "A run is **unreliable** when its self-checks found an impossible value (a rate above the "
             "run's own roofline, a non-positive roofline) or the machine's load changed during it; its "
             "figures are kept but should not be quoted.", ""]
    if not runs:
        lines.append("No `embedkit bench` run in this folder.")
    else:
        lines += ["| run | machine | ops | records | reliable | table | plot |", "|---|---|---|---|---|---|---|"]
        for js, p in runs:
            m = p["machine"]
            where = (m.get("gpu") or {}).get("name") or m.get("cpu", "?")
            ops = ", ".join(dict.fromkeys(r.get("op", "?") for r in p["records"]))
            reliable = p.get("reliable")
            if reliable is None:  # written before runs checked themselves: check its rows now
                bad = sum(1 for r in p["records"] if row_problems(r))
                verdict = (f"**no** (checked later: {bad} rows faster than the run's roofline)" if bad
                           else "rows plausible (checked later; load not recorded)")
            else:
                verdict = "yes" if reliable else "**no**"
            md, png = js.with_suffix(".md"), js.with_suffix(".png")
            table = f"[{md.name}]({md.name})" if md.exists() else ""
            plot = f"[{png.name}]({png.name})" if png.exists() else ""
            lines.append(f"| {p.get('started', js.stem)} | {where} | {ops} | {len(p['records'])} | {verdict} | "
                         f"{table} | {plot} |")
        lines += ["", "## Plots", ""]
        for js, p in runs:
            png = js.with_suffix(".png")
            if png.exists():
                why = "; ".join(p.get("unreliable") or [])
                lines += [f"### {js.stem}" + (" (unreliable)" if p.get("reliable") is False else ""), ""]
                if why:
                    lines += [f"Unreliable: {why}", ""]
                lines += [f"![{js.stem}]({png.name})", ""]
    run_files = {js.with_suffix(ext).name for js, _ in runs for ext in (".json", ".md", ".png")}
    others = sorted(p.name for p in folder.iterdir()
                    if p.is_file() and p.name != "README.md" and p.name not in run_files)
    if others:  # e.g. the static report's report.md / .json, gpu_check's steps files
        lines += ["", "## Other files", ""] + [f"- [{name}]({name})" for name in others]
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def speedup(baseline_ms: float, ms: float) -> float | None:
    """The speedup of a row over a baseline: the baseline's time / the row's time, both measured in the
    same case, on the same machine, in the same run (> 1: the row is faster). None without a time."""
    if not (baseline_ms > 0 and ms > 0 and math.isfinite(baseline_ms) and math.isfinite(ms)):
        return None
    return baseline_ms / ms


def speedup_column(baseline: str) -> str:
    """The record field holding the speedup over `baseline` (an impl name of the same case)."""
    return SPEEDUP_PREFIX + _slug(baseline)


def floor_ms(flops: float | None, nbytes: float | None, rates: dict) -> float:
    """The roofline floor in ms: the larger of FLOPs at the matmul rate and bytes at the copy rate."""
    t_flops = (flops or 0.0) / (rates["matmul_tflops"] * 1e12)
    t_bytes = (nbytes or 0.0) / (rates["copy_gbps"] * 1e9)
    return max(t_flops, t_bytes) * 1e3


def _case_label(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())
