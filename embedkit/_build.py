"""Builds the csrc libraries in place with CMake (`embedkit build`, and the tests' fixture).

`pip install .` / a wheel build runs the same CMakeLists.txt through scikit-build-core; this module is
for rebuilding in a source checkout (after editing csrc/, or to pick other CUDA architectures). The
CMake build tree goes to build/native/ (build/native-cpu/ for a CPU-only build); the libraries go to
the folder the loader reads (embedkit/_lib/, or $EMBEDKIT_NATIVE_DIR).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ENV_DIR = "EMBEDKIT_NATIVE_DIR"  # the library folder; CMake's variable has the same name


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_cuda_architectures() -> str:
    """The default CUDA architectures, as CMakeLists.txt defines them (the one place they live)."""
    text = (repo_root() / "CMakeLists.txt").read_text()
    found = re.search(r'set\(EMBEDKIT_DEFAULT_CUDA_ARCHITECTURES\s+"([^"]+)"\)', text)
    if found is None:
        raise RuntimeError("CMakeLists.txt does not set EMBEDKIT_DEFAULT_CUDA_ARCHITECTURES")
    return found.group(1)


def find_nvcc() -> str | None:
    """nvcc from $CUDACXX, PATH, $CUDA_HOME / $CUDA_PATH, or /usr/local/cuda."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                      *(os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH")
                        if os.environ.get(v)),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def sources() -> list[Path]:
    root = repo_root()
    return [root / "CMakeLists.txt", *sorted(p for p in (root / "csrc").rglob("*") if p.is_file())]


def is_stale(library: Path) -> bool:
    """True if `library` is missing or older than a csrc source (or CMakeLists.txt)."""
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(p.stat().st_mtime > built for p in sources() if p.exists())


def build(*, cuda: bool | None = None, arch: str | None = None, build_dir: str | Path | None = None,
          lib_dir: str | Path | None = None, jobs: int | None = None, verbose: bool = False,
          build_type: str = "Release") -> list[Path]:
    """Configure and build; returns the library files written. cuda: None = if nvcc is found,
    True = required (error without nvcc), False = CPU library only."""
    from .ops import _native

    root = repo_root()
    if not (root / "CMakeLists.txt").exists() or not (root / "csrc").is_dir():
        raise RuntimeError(f"embedkit build needs the source checkout (CMakeLists.txt and csrc/ beside "
                           f"embedkit/ in {root}); install with `pip install -e .` from the repository")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake is not on PATH: install it (`pip install cmake` or the system package)")
    nvcc = find_nvcc() if cuda is not False else None
    if cuda is True and nvcc is None:
        raise RuntimeError("--cuda: no nvcc found (looked at $CUDACXX, PATH, $CUDA_HOME, /usr/local/cuda)")
    use_cuda = nvcc is not None
    build_dir = Path(build_dir) if build_dir else root / "build" / ("native" if use_cuda else "native-cpu")
    lib_dir = Path(lib_dir) if lib_dir else _native.lib_dir()
    configure = [cmake, "-S", str(root), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={build_type}",
                 f"-D{ENV_DIR}={lib_dir.resolve()}", f"-DEMBEDKIT_CUDA={'ON' if use_cuda else 'OFF'}"]
    if use_cuda:
        configure += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                      f"-DCMAKE_CUDA_ARCHITECTURES={arch or default_cuda_architectures()}"]
    targets = ["embedkit_cpu"] + (["embedkit_cuda"] if use_cuda else [])
    compile_ = [cmake, "--build", str(build_dir), "--parallel", str(jobs or os.cpu_count() or 1),
                "--target", *targets]
    for cmd in (configure, compile_):
        if verbose:
            print("+", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, stdout=None if verbose else subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode})" +
                               ("" if verbose else f":\n{done.stdout[-6000:]}"))
    _native.reload()
    return [lib_dir / f"libembedkit_{kind}.so" for kind in ("cpu", "cuda") if kind == "cpu" or use_cuda]
