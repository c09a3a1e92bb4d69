"""Backend selection and validation switches: set_backend, use_backend, EMBEDKIT_BACKEND, set_validation,
available_backends; explicit backends never fall back."""
import os
import subprocess
import sys

import pytest
import torch

import embedkit
from embedkit.ops import _dispatch


def _inputs():
    return torch.randn(6, 4), torch.tensor([0, 2, 6], dtype=torch.int32), torch.randn(5, 4)


def test_default_is_auto_and_auto_on_cpu_never_picks_the_interpreter():
    assert embedkit.get_backend() == "auto"
    assert _dispatch.resolve("pool_project", torch.device("cpu")) in ("native", "reference")


def test_set_backend_and_use_backend_restore():
    embedkit.set_backend("reference")
    assert embedkit.get_backend() == "reference"
    with embedkit.use_backend("triton"):
        assert embedkit.get_backend() == "triton"
        with embedkit.use_backend("auto"):
            assert embedkit.get_backend() == "auto"
        assert embedkit.get_backend() == "triton"
    assert embedkit.get_backend() == "reference"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with embedkit.use_backend("triton"):
            raise RuntimeError("boom")
    assert embedkit.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["cuda", "", None, 3])
def test_unknown_backend_names_are_rejected(bad):
    with pytest.raises(ValueError, match="backend must be one of"):
        embedkit.set_backend(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        with embedkit.use_backend(bad):
            pass


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("EMBEDKIT_BACKEND", "Reference")
    assert embedkit.get_backend() == "reference"
    embedkit.set_backend("triton")  # code wins over the environment
    assert embedkit.get_backend() == "triton"
    embedkit._config._backend = None
    monkeypatch.setenv("EMBEDKIT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="EMBEDKIT_BACKEND must be one of"):
        embedkit.get_backend()


def test_available_backends():
    found = embedkit.available_backends("pool_project")
    assert found[-1] == "reference"
    assert ("triton" in found) == (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
    with pytest.raises(ValueError, match="op must be one of"):
        embedkit.available_backends("no_such_op")


def test_explicit_backend_without_an_implementation_raises(monkeypatch):
    # An op registered with no native implementation: asking for native must not fall back.
    # (monkeypatch restores the registry: later tests see only the real ops)
    monkeypatch.setattr(_dispatch, "_OPS", dict(_dispatch._OPS))
    _dispatch.register_op("_test_only_op", set())
    embedkit.set_backend("native")
    with pytest.raises(embedkit.BackendUnavailableError, match="no 'native' implementation of _test_only_op"):
        _dispatch.resolve("_test_only_op", torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import os, torch, embedkit\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "h, cu, w = torch.randn(6, 4), torch.tensor([0, 2, 6], dtype=torch.int32), torch.randn(5, 4)\n"
        "embedkit.set_backend('triton')\n"
        "try:\n"
        "    embedkit.pool_project(h, cu, w)\n"
        "except embedkit.BackendUnavailableError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EMBEDKIT_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "ERR backend 'triton' cannot run pool_project on cpu tensors" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


def test_set_validation():
    assert embedkit.validation_enabled()
    embedkit.set_validation(False)
    assert not embedkit.validation_enabled()
    h, cu, w = _inputs()
    bad_cu = torch.tensor([0, 2, 6, 6], dtype=torch.int32)  # an empty sequence: a content check (sync)
    out = embedkit.pool_project(h, bad_cu, w)  # not checked: the empty mean is NaN, as documented
    assert torch.isnan(out[2]).all() and torch.isfinite(out[:2]).all()
    embedkit.set_validation(True)
    with pytest.raises(ValueError, match="sequence 2 is empty"):
        embedkit.pool_project(h, bad_cu, w)


def test_cli_info_lists_ops():
    from embedkit.cli import main

    assert main(["info"]) == 0


@pytest.mark.parametrize("value", ["no", "off", "False", 0, 1, None, 0.0])
def test_set_validation_refuses_non_bools(value):
    """A string like "no" is truthy: accepting it would keep validation on while the caller meant off."""
    with pytest.raises(TypeError, match=r"set_validation\(enabled\) must be a bool"):
        embedkit.set_validation(value)
    assert embedkit.validation_enabled()  # unchanged


def test_set_validation_accepts_numpy_bool():
    import numpy as np
    embedkit.set_validation(np.bool_(False))
    assert not embedkit.validation_enabled()
    embedkit.set_validation(True)


@pytest.mark.parametrize("op", ["pool_project", "masked_mean", "varlen_attention", "packed_batch"])
def test_int64_cu_seqlens_message_says_how_to_convert(op):
    """torch.cumsum returns int64; the error says `.to(torch.int32)` (the kernels read int32 offsets)."""
    h, cu, w = _inputs()
    cu64 = torch.nn.functional.pad(torch.cumsum(torch.tensor([2, 4]), 0), (1, 0))
    assert cu64.dtype == torch.int64
    with pytest.raises(TypeError, match=r"cu_seqlens\.to\(torch\.int32\)"):
        if op == "pool_project":
            embedkit.pool_project(h[:6], cu64, w)
        elif op == "masked_mean":
            embedkit.masked_mean(h[:6], cu64)
        elif op == "varlen_attention":
            q = torch.randn(6, 2, 8)
            embedkit.varlen_attention(q, q, q, cu64, 4)
        else:
            embedkit.PackedBatch(cu64, 4)


def test_backends_register_into_the_dispatcher(monkeypatch):
    """Each backend registers itself (name, problem callable, auto priority); auto tries them by
    priority among those allowed on the device, and an explicit name consults only its own callable."""
    assert _dispatch.registered_backends() == ["triton", "native", "reference"]
    monkeypatch.setattr(_dispatch, "_OPS", dict(_dispatch._OPS))  # later tests see only the real ops
    _dispatch.register_op("_test_registry_op", {"native", "triton"})
    seen = []
    real = _dispatch._BACKENDS["native"]
    try:
        _dispatch.register_backend("native", lambda op, dev: seen.append((op, dev.type)) or "switched off",
                                   priority=real.priority, auto_devices=real.auto_devices)
        # auto never tries triton on CPU tensors; native refuses: the reference runs.
        assert _dispatch.resolve("_test_registry_op", torch.device("cpu")) == "reference"
        assert seen == [("_test_registry_op", "cpu")]
        embedkit.set_backend("native")
        with pytest.raises(embedkit.BackendUnavailableError, match="switched off"):
            _dispatch.resolve("_test_registry_op", torch.device("cpu"))
    finally:
        _dispatch._BACKENDS["native"] = real
    with pytest.raises(ValueError, match="backend names"):
        _dispatch.register_backend("cuda", lambda op, dev: None, priority=5)


def _local_imports(path, package: str) -> set[str]:
    """Modules of `package` that the file imports anywhere (function-local imports included)."""
    import ast

    tree = ast.parse(path.read_text())
    here = f"{package}.{path.stem}"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = here.rsplit(".", node.level)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_import_cycle_among_the_ops_modules():
    """embedkit.ops, embedkit.batch and embedkit._config import each other without a cycle, counting
    function-local imports (the dispatcher imports no backend: the backends register into it)."""
    from pathlib import Path

    root = Path(embedkit.__file__).parent
    files = {f"embedkit.ops.{p.stem}": p for p in (root / "ops").glob("*.py") if p.stem != "__init__"}
    files["embedkit.batch"] = root / "batch.py"
    files["embedkit._config"] = root / "_config.py"
    graph = {name: {m for m in _local_imports(path, name.rsplit(".", 1)[0]) if m in files and m != name}
             for name, path in files.items()}
    assert "embedkit.ops._native" not in graph["embedkit.ops._dispatch"]

    def visit(node, stack):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node])

    for name in sorted(graph):
        visit(name, [])
