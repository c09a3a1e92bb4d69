"""The `embedkit` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _cmd_bench(args) -> int:
    root = _repo_root()
    if not (root / "bench" / "run.py").exists():
        print("embedkit bench needs the source checkout (bench/ beside embedkit/): install with "
              "`pip install -e .` from the repository", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from bench.run import main

    main(quick=args.quick, ops=args.op, out_dir=args.out, device=args.device)
    return 0


def _cmd_build(args) -> int:
    from ._build import build

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
    import torch

    import embedkit
    from embedkit.ops import _dispatch

    print(f"embedkit {embedkit.__version__}, torch {torch.__version__}, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    print(f"backend in force: {embedkit.get_backend()}")
    for op in _dispatch.registered_ops():
        print(f"  {op:24s} {', '.join(embedkit.available_backends(op))}")
    return 0


def _cmd_demo(args) -> int:
    from embedkit.train import demo

    demo.run(json_path=args.json, smoke=args.smoke, device=args.device, out_dir=args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the kernel benchmarks and save JSON / Markdown / PNG results")
    b.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    b.add_argument("--op", action="append", help="benchmark only this op (repeatable)")
    b.add_argument("--out", help="results folder (default bench/results/<machine>/)")
    b.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    b.set_defaults(func=_cmd_bench)
    n = sub.add_parser("build", help="build the native csrc libraries with CMake (CPU, and CUDA when nvcc is found)")
    n.add_argument("--cuda", dest="cuda", action="store_true", default=None,
                   help="require the CUDA library (fail without nvcc)")
    n.add_argument("--no-cuda", dest="cuda", action="store_false", help="build the CPU library only")
    n.add_argument("--arch", help='CUDA architectures, CMake syntax (default "80;90a")')
    n.add_argument("--build-dir", help="CMake build tree (default build/native or build/native-cpu)")
    n.add_argument("--lib-dir", help="where the libraries go (default embedkit/_lib or $EMBEDKIT_NATIVE_DIR)")
    n.add_argument("-j", "--jobs", type=int, help="parallel compile jobs")
    n.add_argument("-v", "--verbose", action="store_true", help="show the CMake commands and output")
    n.set_defaults(func=_cmd_build)
    i = sub.add_parser("info", help="versions and the backends available for each op")
    i.set_defaults(func=_cmd_info)
    d = sub.add_parser("demo", help="end-to-end job: MiniLM -> multimodal embedder, evaluate, train 2 stages, "
                                     "soup, evaluate (offline)")
    d.add_argument("--json", help="also write {before, after, throughput} to this JSON file")
    d.add_argument("--smoke", action="store_true", help="tiny sizes (a < 60 s check)")
    d.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    d.add_argument("--out", help="keep the training checkpoints in this folder (default: a temporary one)")
    d.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
