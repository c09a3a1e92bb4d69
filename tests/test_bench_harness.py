"""Benchmarks a reader can trust (issue 16): impossible figures are caught and flagged, the load is
recorded, results go outside the git tree unless asked, every ratio column is kept, and every results
folder has a one-page summary linking its plots."""
import json
import warnings
from pathlib import Path

import pytest
import torch

from bench import harness, run
from bench.harness import BenchRun

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rooflines():
    return harness.measure_rooflines(torch.device("cpu"), quick=True)


def _run(tmp_path, **kw):
    return BenchRun("cpu", quick=True, out_dir=tmp_path, **kw)


def test_default_results_folder_is_outside_the_git_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("EMBEDKIT_BENCH_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    b = BenchRun("cpu", quick=True)
    assert b.out_dir == tmp_path / "cache" / "embedkit" / "bench" / harness.machine_name(torch.device("cpu"))
    assert ROOT not in b.out_dir.parents
    monkeypatch.setenv("EMBEDKIT_BENCH_DIR", str(tmp_path / "mine"))
    assert BenchRun("cpu", quick=True).out_dir.parent == tmp_path / "mine"


def test_a_plausible_run_is_reliable_and_records_the_load(tmp_path):
    b = _run(tmp_path)
    # a row well below both rooflines: 1 byte and 1 FLOP in a second
    b.record("op", {"n": 1}, "impl", ms=1000.0, bytes_moved=1.0, flops=1.0)
    paths = b.save("t")
    payload = json.loads(paths[0].read_text())
    load = payload["machine"]
    for key in ("load_start", "load_end"):
        assert set(load[key]) == {"loadavg", "process_cpu_s", "wall_s"}
        assert load[key]["process_cpu_s"] > 0
    assert load["run_process_cpu_s"] >= 0 and load["run_wall_s"] > 0
    assert "end_of_run" in payload["rooflines"]
    if payload["reliable"]:  # the machine may be loaded (it is shared): then a reason is recorded
        assert payload["unreliable"] == []
    else:
        assert all("load" in why or "moved" in why for why in payload["unreliable"]), payload["unreliable"]
    assert "unreliable" not in payload["records"][0]


def test_a_rate_above_the_roofline_flags_the_row_and_the_run(tmp_path):
    b = _run(tmp_path)
    copy = b.rooflines["copy_gbps"] * 1e9
    with pytest.warns(RuntimeWarning, match="unreliable: op n=2 impl: frac_copy_bw = 22"):
        row = b.record("op", {"n": 2}, "impl", ms=1000.0, bytes_moved=22 * copy)  # 22x the copy bandwidth
    assert "frac_copy_bw" in row["unreliable"]
    assert not b.reliable
    paths = b.save("t")
    payload = json.loads(paths[0].read_text())
    assert payload["reliable"] is False and any("frac_copy_bw" in w for w in payload["unreliable"])
    md = paths[1].read_text()
    assert "**UNRELIABLE RUN**" in md and "| reliable |" in md and "**no**" in md
    summary = (tmp_path / "README.md").read_text()
    assert "**no**" in summary


def test_roofline_problems_catch_zero_and_nan():
    assert harness.roofline_problems({"matmul_tflops": 0.0, "copy_gbps": 10.0})
    assert harness.roofline_problems({"matmul_tflops": 1.0, "copy_gbps": float("nan")})
    assert not harness.roofline_problems({"matmul_tflops": 0.004, "copy_gbps": 3.0})
    assert harness.row_problems({"ms": 0.0})
    assert harness.row_problems({"ms": 1.0, "frac_of_floor": 1.5})
    assert not harness.row_problems({"ms": 1.0, "frac_of_floor": 0.5, "frac_matmul": 0.99})


def test_markdown_keeps_every_ratio_column_and_small_rates_are_not_printed_as_zero(tmp_path):
    b = _run(tmp_path)
    b.rooflines["matmul_tflops"] = 0.004123  # a loaded 2-core CPU: "%.2f" printed 0.00
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b.record("encode", {"model": "m"}, "embedkit", ms=10.0, sentences_per_s=100.0,
                 speedup_vs_st_default=1.3, min_cosine_vs_st=0.999999)
        b.record("encode", {"model": "m"}, "sentence-transformers", ms=13.0, sentences_per_s=77.0,
                 speedup_vs_st_default=1.0, min_cosine_vs_st=1.0)
    md = b.markdown()
    header = next(line for line in md.splitlines() if line.startswith("| case | impl |"))
    for col in ("ms", "sentences_per_s", "speedup_vs_st_default", "min_cosine_vs_st"):
        assert f" {col} " in header, header
    assert "0.004123 TFLOP/s" in md


def test_summary_links_every_plot_and_table(tmp_path):
    pytest.importorskip("matplotlib")
    for tag in ("one", "two"):
        b = _run(tmp_path)
        b.record("op", {"n": 1}, "a", ms=2.0)
        b.record("op", {"n": 1}, "b", ms=1.0)
        b.record("op", {"n": 1000}, "a", ms=2000.0)
        paths = b.save(tag)
        assert paths[2].suffix == ".png" and paths[-1].name == "README.md"
    summary = (tmp_path / "README.md").read_text()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    mds = sorted(p.name for p in tmp_path.glob("*.md") if p.name != "README.md")
    assert len(pngs) == 2 and len(mds) == 2
    for name in pngs + mds:
        assert f"({name})" in summary
    assert summary.count("![") == 2


def test_run_main_save_to_writes_under_the_machine_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_BENCH_DIR", str(tmp_path / "default"))
    paths = run.main(quick=True, ops=["pool_project"], device="cpu", save_to=str(tmp_path / "results"))
    folder = tmp_path / "results" / harness.machine_name(torch.device("cpu"))
    assert all(p.parent == folder for p in paths)
    assert (folder / "README.md").is_file()
    assert not (tmp_path / "default").exists()
    with pytest.raises(SystemExit, match="not both"):
        run.main(quick=True, ops=["pool_project"], device="cpu", save_to="x", out_dir="y")


def test_an_older_run_is_re_rendered_with_every_column_and_checked(tmp_path):
    """A run saved before the self-checks (no "reliable" key): from_json checks its rows now."""
    b = _run(tmp_path)
    copy = b.rooflines["copy_gbps"] * 1e9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b.record("pack", {"B": 16}, "torch", ms=1.0, bytes_moved=1.68 * copy * 1e-3, speedup=2.0)
    payload = {"started": b.started, "machine": {"device": "cpu", "cpu": "x", "cpu_count": 2, "torch": "t",
                                                  "triton": None, "cuda": None},
               "rooflines": {k: b.rooflines[k] for k in ("matmul_dtype", "matmul_tflops", "copy_gbps")},
               "records": [{k: v for k, v in r.items() if k != "unreliable"} for r in b.records]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(payload))
    old = BenchRun.from_json(path)
    assert not old.reliable and "frac_copy_bw" in old.records[0]["unreliable"]
    md = old.markdown()
    assert "**UNRELIABLE RUN**" in md and " speedup " in md and "load not recorded" in md


def test_speedup_has_one_definition_the_baselines_time_over_the_rows(tmp_path):
    b = _run(tmp_path)
    case = {"T": 8}
    for impl, ms in (("embedkit", 2.0), ("torch", 6.0), ("other", 1.0)):
        b.record("op", case, impl, ms=ms)
    b.record("op", {"T": 9}, "torch", ms=100.0)  # another case: never compared
    b.add_speedups("op", case, baselines=["torch", "other", "not-measured"])
    rows = {r["impl"]: r for r in b.records if r["case"] == case}
    assert rows["embedkit"]["speedup_vs_torch"] == 3.0 and rows["embedkit"]["speedup_vs_other"] == 0.5
    assert not any(k.startswith("speedup") for k in (*rows["torch"], *rows["other"]))
    assert harness.speedup(6.0, 2.0) == 3.0 and harness.speedup(float("nan"), 2.0) is None
    md = b.markdown()
    assert "speedup_vs_torch" in md and "speedup_vs_other" in md


def test_bench_op_takes_every_registered_op():
    from embedkit.ops import _dispatch

    assert set(run.OP_BENCHMARKS) == set(_dispatch.registered_ops())
    assert set(run.OP_BENCHMARKS.values()) <= set(run.BENCHMARKS)
    assert run.plan(["pack", "masked_mean"]) == {"native": ["pack", "masked_mean"]}
    assert run.plan(["varlen_attention"]) == {"attention": None}
    with pytest.raises(ValueError, match="unknown --op"):
        run.plan(["attn"])
    # `embedkit bench --help` names them all (the CLI cannot import bench/ to list them: a wheel lacks it)
    import argparse

    from embedkit import cli

    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    op = next(a for a in sub.choices["bench"]._actions if "--op" in a.option_strings)
    assert all(name in op.help for name in run.choices()), op.help


def test_attention_variants_run_the_kernel_options_they_name(monkeypatch):
    """bench_attention's VARIANTS (timed beside embedkit's default row on a GPU) build the calls they say:
    the atomic backward's flag, and rotary tables over D / D/2 from each token's position in its sequence."""
    from bench import bench_attention as ba

    import embedkit

    c = ba._Case([3, 5], 4, 2, 16, torch.float32, torch.device("cpu"))
    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4])
    with embedkit.use_backend("reference"):
        plain = embedkit.varlen_attention(c.q, c.k, c.v, c.cu, c.max_len)
        for name, R in (("embedkit-triton-rotary", 16), ("embedkit-triton-rotary-half", 8)):
            fwd, leaves, grad_fn = ba._variant_impl(c, "reference", name)
            want = embedkit.varlen_attention(c.q, c.k, c.v, c.cu, c.max_len, rotary=embedkit.rotary_tables(pos, R))
            got = fwd()
            assert torch.equal(got, want) and not torch.allclose(got, plain), name
            assert leaves == c.leaves() and grad_fn(got) is c.grad
    calls = []
    real = embedkit.varlen_attention
    monkeypatch.setattr(embedkit, "varlen_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    ba._variant_impl(c, "reference", "embedkit-triton-atomic")[0]()
    assert calls[0]["deterministic"] is False and calls[0]["rotary"] is None
