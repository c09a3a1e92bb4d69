"""Benchmark harness shared by every embedkit benchmark.

A BenchRun records, for one invocation: the machine (GPU name, driver, clocks, memory and power
limit through nvidia-ml-py; CPU model otherwise), the software versions, and two rooflines
measured in the same run -- the dense matmul rate (bf16 on GPU, fp32 on CPU) and the
device-to-device copy bandwidth -- so every figure is also reported as a fraction of them. It
writes one JSON file per run under bench/results/<machine>/, with a Markdown table and a PNG plot
beside it.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

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
    return {"matmul_dtype": str(dtype).replace("torch.", ""), "matmul_n": n,
            "matmul_tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12,
            "copy_bytes": copy_bytes, "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9}


class BenchRun:
    """One benchmark invocation: rooflines, then records of (op, case, impl, metrics)."""

    def __init__(self, device: torch.device | str | None = None, *, quick: bool = False,
                 out_dir: Path | str | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.quick = quick
        self.out_dir = Path(out_dir) if out_dir else RESULTS_DIR / machine_name(self.device)
        self.started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.machine = machine_info(self.device)
        self.rooflines = measure_rooflines(self.device, quick)
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.deadline: float | None = None  # time.monotonic() by which the run should stop (gpu_check)
        self.skipped: list[str] = []

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
        self.records.append(row)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items() if k not in ("op", "case", "impl"))
        print(f"{op:16s} {_case_label(case):44s} {impl:28s} {shown}")
        return row

    # ---- output -------------------------------------------------------------------------------
    def save(self, tag: str = "run") -> list[Path]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"{self.started}-{_slug(tag)}"
        payload = {"started": self.started, "quick": self.quick, "machine": self.machine,
                   "rooflines": self.rooflines, "datasheet": DATASHEET, "notes": self.notes,
                   "skipped": self.skipped, "records": self.records}
        paths = [stem.with_suffix(".json")]
        paths[0].write_text(json.dumps(payload, indent=2, default=str))
        paths.append(stem.with_suffix(".md"))
        paths[1].write_text(self.markdown())
        png = self._plot(stem.with_suffix(".png"))
        if png:
            paths.append(png)
        return paths

    def markdown(self) -> str:
        m, r = self.machine, self.rooflines
        where = m.get("gpu", {}).get("name") or m["cpu"]
        lines = [f"# embedkit benchmark, {self.started}", "",
                 f"Machine: {where} ({m['device']}); torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}.",
                 f"Rooflines measured in this run: {r['matmul_dtype']} matmul {r['matmul_tflops']:.2f} TFLOP/s, "
                 f"copy {r['copy_gbps']:.1f} GB/s.",
                 "frac_of_floor = floor_ms / ms, where floor_ms is the larger of the case's FLOP floor at that "
                 "matmul rate and its byte floor at that copy rate; floor_ms_*_datasheet are the same floors at "
                 "datasheet peaks (not measured). Every ratio column of the records is shown.", ""]
        lines += [f"- {n}" for n in self.notes]
        for op in dict.fromkeys(rec["op"] for rec in self.records):
            rows = [rec for rec in self.records if rec["op"] == op]
            cols = _columns(rows)
            lines += ["", f"## {op}", "", "| case | impl | " + " | ".join(cols) + " |",
                      "|---|---|" + "---|" * len(cols)]
            for rec in rows:
                vals = [f"{rec[c]:.4g}" if isinstance(rec.get(c), (int, float)) else "" for c in cols]
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
        fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.6 * len(ops)), squeeze=False)
        for ax, op in zip(axes[:, 0], ops):
            rows = [rec for rec in self.records if rec["op"] == op]
            cases = list(dict.fromkeys(_case_label(rec["case"]) for rec in rows))
            impls = list(dict.fromkeys(rec["impl"] for rec in rows))
            width = 0.8 / max(1, len(impls))
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, c in enumerate(cases):
                    hit = [rec["ms"] for rec in rows if rec["impl"] == impl and _case_label(rec["case"]) == c]
                    if hit:
                        xs.append(i + j * width)
                        ys.append(hit[0])
                ax.bar(xs, ys, width=width, label=impl)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
            ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("ms (lower is better)")
            ax.set_title(f"{op} on {self.machine.get('gpu', {}).get('name') or self.machine['cpu']}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


_FIRST_COLUMNS = ("ms", "frac_of_floor", "floor_ms", "gbps", "frac_copy_bw", "tflops", "frac_matmul",
                  "peak_mb", "extra_mb", "speedup")
_HIDDEN_COLUMNS = {"floor_flops", "floor_bytes"}


def _columns(rows: list[dict]) -> list[str]:
    """Every numeric field any row carries (known ones first), so no ratio column is dropped."""
    keys = [k for rec in rows for k, v in rec.items()
            if k not in ("op", "case", "impl") and k not in _HIDDEN_COLUMNS
            and isinstance(v, (int, float)) and not isinstance(v, bool)]
    seen = list(dict.fromkeys(keys))
    return [c for c in _FIRST_COLUMNS if c in seen] + [c for c in seen if c not in _FIRST_COLUMNS]


def floor_ms(flops: float | None, nbytes: float | None, rates: dict) -> float:
    """The roofline floor in ms: the larger of FLOPs at the matmul rate and bytes at the copy rate."""
    t_flops = (flops or 0.0) / (rates["matmul_tflops"] * 1e12)
    t_bytes = (nbytes or 0.0) / (rates["copy_gbps"] * 1e9)
    return max(t_flops, t_bytes) * 1e3


def _case_label(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())
