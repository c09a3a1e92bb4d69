"""The static sm_90a report (bench/static_report.py) in CI: one case per op compiled for sm_90a with the
JIT's real specialization; fails when a config a launcher may pick does not fit shared memory, spills
inside a loop, or uses mma.sync where its tile allows wgmma, unless the kernel file waives it in
SM90_WAIVERS with a reason. Compiles are cached on disk, so a rerun takes seconds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import static_report  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled by running them")


@pytest.mark.slow  # the sm_90a compiles (the checks' unit tests below are fast)
def test_ci_subset_has_no_unwaived_failure(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "bench.static_report", "--ci", "--strict", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    rep = json.loads((tmp_path / "report.json").read_text()) if (tmp_path / "report.json").exists() else None
    assert rep is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not rep["case_errors"], rep["case_errors"]
    open_failures = [(e["kernel"], e["config"], f) for e in rep["entries"] for f in e["failures"] if not f["waived"]]
    assert not open_failures, "unwaived sm_90a failures:\n" + "\n".join(map(str, open_failures))
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = {e["kernel"].split(".")[-1] for e in rep["entries"]}
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_masked_mean_kernel", "_masked_mean_bwd_kernel"):
        assert name in kernels, kernels
    for e in rep["entries"]:
        assert e["figures"]["registers"] > 0, e
    # the real specialization reaches the compiler: some spec carries the divisibility hint, and
    # the matrix products are wgmma on at least one kernel
    assert any(e["spec"].get("attrs") for e in rep["entries"]), "no tt.divisibility attribute recorded"
    assert any(e["figures"]["hgmma"] > 0 for e in rep["entries"])


def _spec(**constexprs):
    return {"module": "embedkit._triton.attention", "name": "_attn_fwd_kernel", "constexprs": constexprs,
            "options": {"num_warps": 4, "num_stages": 2}}


def _fig(**kw):
    base = {"shared_bytes": 1024, "stl_in_loop": 0, "ldl_in_loop": 0, "hmma": 0, "hgmma": 4}
    return {**base, **kw}


def test_checks_flag_smem_spill_and_mma_sync(monkeypatch):
    monkeypatch.setattr(static_report, "_waivers", lambda module: [])
    spec = _spec(BLOCK_M=64, BLOCK_N=64)
    assert static_report.checks(spec, _fig()) == []
    assert [f["check"] for f in static_report.checks(spec, _fig(shared_bytes=300_000))] == ["smem"]
    assert [f["check"] for f in static_report.checks(spec, _fig(ldl_in_loop=3))] == ["spill"]
    assert [f["check"] for f in static_report.checks(spec, _fig(hmma=8, hgmma=0))] == ["wgmma"]
    # a 16-row tile cannot use wgmma: mma.sync is right there
    assert static_report.checks(_spec(BLOCK_M=16, BLOCK_N=16), _fig(hmma=8, hgmma=0)) == []


def test_waiver_matches_only_its_config(monkeypatch):
    waivers = [{"kernel": "_attn_fwd_kernel", "match": {"BLOCK_M": 64, "num_warps": 4}, "check": "spill",
                "reason": "known"}]
    monkeypatch.setattr(static_report, "_waivers", lambda module: waivers)
    hit = static_report.checks(_spec(BLOCK_M=64, BLOCK_N=64), _fig(stl_in_loop=2))
    miss = static_report.checks(_spec(BLOCK_M=128, BLOCK_N=64), _fig(stl_in_loop=2))
    other_check = static_report.checks(_spec(BLOCK_M=64, BLOCK_N=64), _fig(shared_bytes=300_000))
    assert hit[0]["waived"] == "known" and miss[0]["waived"] is None and other_check[0]["waived"] is None


def test_merge_reports_keeps_other_ops_and_refuses_other_triton():
    from bench import static_report as sr

    def entry(op, name):
        return {"kernel": f"embedkit._triton.{op}.{name}", "failures": []}

    old = {"triton": "3.9.0", "quick": False, "seconds": 10.0, "case_errors": {},
           "entries": [entry("attention", "_attn_fwd_kernel"), entry("nce", "_nce_old_kernel")]}
    new = {"triton": "3.9.0", "quick": False, "seconds": 2.0, "case_errors": {},
           "entries": [entry("nce", "_nce_fwd_kernel")]}
    merged = sr.merge_reports(old, new, ["nce"])
    assert [e["kernel"].split(".")[-1] for e in merged["entries"]] == ["_attn_fwd_kernel", "_nce_fwd_kernel"]
    assert merged["merged_ops"] == ["nce"] and merged["seconds"] == 12.0
    with pytest.raises(SystemExit, match="cannot take"):
        sr.merge_reports({**old, "triton": "3.6.0"}, new, ["nce"])


def test_stub_return_jumps_after_exit_are_not_loops():
    """ptxas puts TMA / mbarrier wait retries out of line after the last EXIT; their jumps back into the body
    are not loops (before, the LDL after the real loop below counted as 'in a loop'). The real loop's spill,
    and a spin loop inside a stub, still count as loops."""
    from bench import sm90

    def line(addr, insn):
        return f"        /*{addr:04x}*/                   {insn} ;"
    body = [(0x10, "MOV R1, R2"), (0x20, "STL [R1], R2"), (0x30, "LDL R3, [R1]"), (0x40, "@!P0 BRA 0x20"),
            (0x50, "LDL R4, [R1]"), (0x60, "EXIT"), (0x70, "@!P1 BRA 0x70"), (0x80, "BRA 0x50"),
            (0x90, "BRA 0x90")]
    fig = sm90.analyze_sass("\n".join(line(a, i) for a, i in body))
    assert (fig["stl_in_loop"], fig["ldl_in_loop"], fig["ldl"]) == (1, 1, 2)
    assert fig["loops"] == 3  # the real loop, the stub's spin loop, the trailing self-branch
