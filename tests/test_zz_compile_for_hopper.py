"""Runs last (file order): every Triton kernel specialization that the interpreter tests launched
is compiled for sm_90 (H100 / H200), with no GPU. See hopper_aot.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hopper_aot

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled by running them")


def test_every_launched_kernel_compiles_for_sm90(tmp_path):
    if not hopper_aot.recorded:
        pytest.skip("no interpreted kernel launch was recorded (run with the rest of the suite)")
    specs = list(hopper_aot.recorded.values())
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    if os.environ.get("EMBEDKIT_AOT_DUMP"):  # to compile the same specs under another Triton version
        Path(os.environ["EMBEDKIT_AOT_DUMP"]).write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("hopper_aot.py")), str(path), "90"],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["errors"], "kernels that do not compile for sm_90:\n" + "\n".join(result["errors"])
    kernels = {(s["module"], s["name"]) for s in specs}
    print(f"compiled {result['compiled']} specializations of {len(kernels)} kernels for sm_90")
