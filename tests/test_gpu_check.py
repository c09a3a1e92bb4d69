"""bench/gpu_check.sh --dry-run: the one-command GPU check starts, runs every step on the CPU at tiny
sizes and writes its files, so the first lent GPU is not spent debugging the script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the whole GPU check script, dry run

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    env["OUT"] = str(tmp_path / "out")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--budget", "240",
                           "--out", str(tmp_path / "results")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    files = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert any(f.endswith("-gpu-check.json") for f in files), files
    assert any(f.endswith("-gpu-check.md") for f in files), files
    assert any(f.endswith("-gpu-check-steps.json") for f in files), files
    steps = json.loads(next((tmp_path / "results").glob("*-gpu-check-steps.json")).read_text())
    assert steps["dry_run"] and not [s for s in steps["steps"] if s["status"] == "failed"], steps["steps"]
    run = json.loads(next((tmp_path / "results").glob("*-gpu-check.json")).read_text())
    ops = {r["op"] for r in run["records"]}
    assert {"nce_loss", "attention", "pool_project"} <= ops, ops
    # every row of a kernel benchmark states its floors and its fraction of them
    for rec in run["records"]:
        if rec["op"] in ("nce_loss", "attention", "pool_project"):
            assert rec["floor_ms"] > 0 and rec["frac_of_floor"] > 0, rec
            assert rec["floor_ms_h100-sxm_datasheet"] > 0, rec
    copied = list((tmp_path / "out").rglob("*"))
    assert len([p for p in copied if p.is_file()]) >= 3, copied


def test_budget_skips_and_records(tmp_path):
    """A budget too small for any benchmark: every step is recorded as skipped, none fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--budget", "1",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    steps = json.loads(next(tmp_path.glob("*-gpu-check-steps.json")).read_text())
    assert steps["steps"] and all(s["status"] == "skipped" for s in steps["steps"]), steps["steps"]
