#!/usr/bin/env bash
# The one command for a lent GPU (see bench/gpu_check.py): build, GPU tests, headline benchmarks,
# results in bench/results/<gpu>/ (and $OUT). Runs from the source tree with no install (PYTHONPATH),
# so it needs nothing beyond the GPU image (torch, triton, transformers, sentence-transformers,
# CMake, nvcc). Options: --budget SECONDS (default 450), --dry-run (CPU, tiny sizes), --out DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" -m bench.gpu_check "$@"
