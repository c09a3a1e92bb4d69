"""Type hints of the public API (issue 16): every public function and PackedBatch constructor is
fully annotated, and mypy (configured leniently in pyproject.toml's [tool.mypy]: the public modules)
finds no error. mypy is in the `test` extra, so CI runs it."""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import embedkit
import embedkit.ops

pytestmark = pytest.mark.slow  # mypy over the public modules

ROOT = Path(__file__).resolve().parent.parent


def _public_functions():
    seen = {}
    for mod in (embedkit, embedkit.ops):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or (callable(obj) and hasattr(obj, "__wrapped__")):
                seen[name] = inspect.unwrap(obj)
    for name in ("from_lengths", "from_attention_mask", "from_padded", "unpad", "pad", "attention_mask",
                 "seq_ids", "positions", "to"):
        seen[f"PackedBatch.{name}"] = getattr(embedkit.PackedBatch, name)
    return seen


@pytest.mark.parametrize("name,fn", sorted(_public_functions().items()))
def test_public_function_is_fully_annotated(name, fn):
    sig = inspect.signature(fn)
    missing = [p.name for p in sig.parameters.values()
               if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")]
    assert not missing, f"{name}: parameters without a type hint: {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return type hint"


def test_mypy_finds_no_error_in_the_public_modules(tmp_path):
    pytest.importorskip("mypy", reason="mypy is in the test extra (pip install -e .[test])")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embedkit" / "mypy"
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "Success" in proc.stdout
