"""The linter of CI: `ruff check .` over the whole repository with the configuration in pyproject.toml's
[tool.ruff] (pyflakes F -- unused imports, undefined names, redefinitions -- and E9 syntax errors).
It runs here, in the README's test command, so a contributor's test run lints as CI does; ruff is in
the `test` extra."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:  # the pip package: `python -m ruff` runs its binary
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is in the test extra (pip install -e .[test])")
    return [exe]


def test_ruff_finds_nothing():
    proc = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
