"""Packaging facts a user relies on: our own distribution name, one version, the license, the build
backend for native code, one library-folder variable, one place for the CUDA architectures, a README
without links out of the repository, and an `import embedkit` that does not pull in the compiler.

The wheel itself (tag, contents, a fresh venv outside the tree) is checked by .ci/wheel_smoke."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import embedkit
from embedkit import _build

ROOT = Path(__file__).resolve().parent.parent

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_distribution_name_is_ours_and_import_name_is_embedkit():
    project = _pyproject()["project"]
    assert project["name"] == "embedkit-kernels"  # the index's "embedkit" is an unrelated project
    assert project["scripts"] == {"embedkit": "embedkit.cli:main"}
    readme = (ROOT / "README.md").read_text()
    assert "pip install embedkit-kernels" in readme or "embedkit-kernels" in readme
    assert re.search(r"`embedkit` on the package index is (a different|another|an unrelated) project", readme)


def test_version_has_one_source():
    data = _pyproject()
    assert "version" not in data["project"] and "version" in data["project"]["dynamic"]
    skb = data["tool"]["scikit-build"]
    assert skb["metadata"]["version"] == {"provider": "scikit_build_core.metadata.regex",
                                          "input": "embedkit/__init__.py"}
    init = (ROOT / "embedkit" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', init, re.M) == [embedkit.__version__]
    assert f"## {embedkit.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    # no other file spells out a version of embedkit
    for path in [*ROOT.glob("embedkit/**/*.py"), ROOT / "CMakeLists.txt"]:
        if path.name != "__init__.py" or path.parent.name != "embedkit":
            assert not re.search(r"^\s*(__version__|VERSION)\s*=", path.read_text(), re.M), path


def test_license_and_typing_marker():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190  # the full text
    assert _pyproject()["project"]["license"] == {"text": "Apache-2.0"}
    assert (ROOT / "embedkit" / "py.typed").exists()


def test_build_backend_is_made_for_native_code():
    data = _pyproject()
    assert data["build-system"]["build-backend"] == "scikit_build_core.build"
    skb = data["tool"]["scikit-build"]
    assert skb["wheel"]["py-api"] == "py3"  # ctypes libraries: py3-none-<platform>, never py3-none-any
    assert set(skb["wheel"]["packages"]) == {"embedkit"}
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "install(TARGETS ${target} LIBRARY DESTINATION embedkit/_lib)" in cmake


def test_default_cuda_architectures_live_in_cmakelists_only():
    archs = _build.default_cuda_architectures()
    assert re.fullmatch(r"\d+[a-z]?(;\d+[a-z]?)*", archs)
    literal = re.compile(re.escape(f'"{archs}"'))
    for path in [*ROOT.glob("embedkit/**/*.py"), *ROOT.glob(".ci/*")]:
        assert not literal.search(path.read_text()), f"{path} repeats the default CUDA architectures"
    assert not hasattr(_build, "DEFAULT_CUDA_ARCHITECTURES")


def _configure(tmp_path: Path, *defines: str, env: dict | None = None) -> tuple[str, str]:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake")
    build = tmp_path / "b"
    done = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-DEMBEDKIT_CUDA=OFF", *defines],
                          capture_output=True, text=True, env=env or os.environ.copy(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    cache = (build / "CMakeCache.txt").read_text()
    found = re.search(r"^EMBEDKIT_NATIVE_DIR:PATH=(.*)$", cache, re.M)
    assert "EMBEDKIT_LIB_DIR:" not in cache
    return found.group(1), done.stderr


@pytest.mark.slow  # four CMake configures
def test_one_library_folder_variable_old_name_deprecated(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EMBEDKIT_NATIVE_DIR"}
    folder, err = _configure(tmp_path / "default", env=env)
    assert Path(folder) == ROOT / "embedkit" / "_lib" and "deprecated" not in err
    folder, err = _configure(tmp_path / "new", f"-DEMBEDKIT_NATIVE_DIR={tmp_path / 'n'}", env=env)
    assert Path(folder) == tmp_path / "n" and "deprecated" not in err
    folder, err = _configure(tmp_path / "old", f"-DEMBEDKIT_LIB_DIR={tmp_path / 'o'}", env=env)
    assert Path(folder) == tmp_path / "o" and "EMBEDKIT_LIB_DIR is deprecated" in err
    # the loader's environment variable is CMake's default too
    folder, _ = _configure(tmp_path / "env", env={**env, "EMBEDKIT_NATIVE_DIR": str(tmp_path / "e")})
    assert Path(folder) == tmp_path / "e"
    assert _build.ENV_DIR == "EMBEDKIT_NATIVE_DIR"


def test_readme_links_stay_inside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"https?://|www\.", readme)
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target


def test_readme_install_and_version_commands_are_there():
    readme = (ROOT / "README.md").read_text()
    for command in ("bash .ci/setup demo,bench && .venv/bin/embedkit demo",
                    "bash .ci/setup test,demo && .venv/bin/python -m pytest -q",
                    "embedkit --version", "python -m embedkit", "embedkit.__version__", "pip install"):
        assert command in readme, command
    assert (ROOT / ".ci" / "run").read_text().count("bash .ci/setup test,demo && .venv/bin/python -m pytest -q") == 1
    assert "bash .ci/wheel_smoke" in (ROOT / ".ci" / "run").read_text()


def test_import_embedkit_does_not_import_the_compiler():
    code = ("import sys, embedkit; heavy = [m for m in ('torch._dynamo', 'triton', 'transformers', 'sympy') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_triton_kernels_never_import_the_rest_of_embedkit():
    """embedkit/_triton holds only kernels and launchers (torch + triton): an import of any other
    embedkit module from there would make the kernels depend on the layers that call them."""
    import ast

    root = Path(__file__).resolve().parents[1] / "embedkit" / "_triton"
    files = sorted(root.glob("*.py"))
    assert files, root
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{f.name}: {n}" for n in names if n == "embedkit" or (n.startswith("embedkit.")
                                                                         and not n.startswith("embedkit._triton"))]
    assert not bad, bad
    assert not (root.parents[1] / "tritonkernels").exists(), "the old top-level package is back"
