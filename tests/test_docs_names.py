"""The documentation names the native library folder variable by its one current name.

EMBEDKIT_NATIVE_DIR is read by both CMake and the loader; EMBEDKIT_LIB_DIR is a deprecated CMake alias
and may only appear where a document says so.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("doc", ["README.md", "csrc/README.md"])
def test_old_folder_variable_only_mentioned_as_deprecated(doc):
    text = (ROOT / doc).read_text()
    paragraphs = [p for p in text.split("\n\n") if "EMBEDKIT_LIB_DIR" in p]
    for p in paragraphs:
        assert "deprecat" in p.lower(), f"{doc}: EMBEDKIT_LIB_DIR mentioned without 'deprecated':\n{p}"


def test_csrc_readme_names_the_current_variable():
    assert "EMBEDKIT_NATIVE_DIR" in (ROOT / "csrc/README.md").read_text()
