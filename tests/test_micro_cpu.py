"""bench/micro_cpu.py (pytest-benchmark microbenchmarks) runs: each benchmark once, untimed
(--benchmark-disable), so the microbenchmarks cannot rot. Timings are bench/'s business, not tests'."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a pytest run of bench/micro_cpu.py

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_microbenchmarks_run():
    pytest.importorskip("pytest_benchmark")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           "bench/micro_cpu.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "6 passed" in proc.stdout, proc.stdout[-2000:]
