"""Every Triton kernel specialization that the interpreter tests launched is compiled for sm_90
(H100 / H200), with no GPU; so are the NCE kernels' pinned GPU tiles, which must not spill at all.
See hopper_aot.py.

The launch check must run after every test that launches a kernel (the recorder in conftest notes
the launches as they happen): it is marked `after_all`, and conftest's pytest_collection_modifyitems
puts those tests at the end of the run, whatever the file order. Run alone it skips (nothing was
recorded); run with a selection (`pytest tests/test_pool_project.py tests/test_compile_for_hopper.py`)
it compiles the specializations of that selection."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hopper_aot

# The sm_90 compiles (the slow tier) run without a GPU only.
without_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled by running them")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _compile_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _run_hopper_aot(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-W", "ignore", str(TESTS / "hopper_aot.py"), *args, "90"],
                          env=_compile_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.after_all  # after every test file (and its lazy imports) has been imported
def test_helpers_are_imported_once_and_the_recorder_wraps_once():
    """One module name per helper file (conftest, numerics, hopper_aot): a second name would run the
    file twice -- for conftest, a second recorder wrapped around every launch."""
    names: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve().parent == TESTS:
            names.setdefault(Path(path).name, []).append(name)
    twice = {f: n for f, n in names.items() if len(n) > 1}
    assert not twice, f"test helpers imported under two module names (use the plain names): {twice}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert hopper_aot.recorder_layers() == 1


@pytest.mark.after_all
@pytest.mark.slow
@without_gpu
def test_every_launched_kernel_compiles_for_sm90(tmp_path):
    if not hopper_aot.recorded:
        pytest.skip("no interpreted kernel launch was recorded (run with the rest of the suite)")
    specs = list(hopper_aot.recorded.values())
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    if os.environ.get("EMBEDKIT_AOT_DUMP"):  # to compile the same specs under another Triton version
        Path(os.environ["EMBEDKIT_AOT_DUMP"]).write_text(json.dumps(specs))
    result = _run_hopper_aot(str(path))
    assert not result["errors"], "kernels that do not compile for sm_90:\n" + "\n".join(result["errors"])
    kernels = {(s["module"], s["name"]) for s in specs}
    print(f"compiled {result['compiled']} specializations of {len(kernels)} kernels for sm_90")


@pytest.mark.slow
def test_nce_gpu_tiles_compile_for_sm90_without_spilling():
    """The interpreter does not run Triton's compiler (e.g. it accepts non-constexpr globals): the NCE
    kernels at their GPU tiles (bf16 3-level, fp16 1-level) compile to sm_90 PTX / cubin here, which
    needs no GPU, with no local memory (moved here from tests/test_nce.py)."""
    pytest.importorskip("triton.backends.nvidia")
    result = _run_hopper_aot("--pinned")
    assert not result["errors"], "NCE kernels that do not compile for sm_90 or spill:\n" + "\n".join(result["errors"])
    assert result["compiled"] > 0
