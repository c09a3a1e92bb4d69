"""Ahead-of-time compilation of the Triton kernels for Hopper (sm_90), with no GPU.

The interpreter runs kernels as Python and accepts code that the real compiler rejects (types,
layouts, unsupported ops). While the test suite runs kernels under TRITON_INTERPRET=1, `record`
notes every launch as the GPU JIT would specialize it (ints equal to 1 become constexprs, pointers
and ints divisible by 16 carry tt.divisibility=16: bench/sm90.specialize runs the JIT's own binder);
`compile_all` (run in a subprocess without the interpreter) compiles one specialization per
(kernel, argument types, specialization) to a cubin for sm_90 with those attributes, so CI checks
the code a GPU would run (without the hints the compiler emits 16-bit loads and spills that the
real code does not have), and a kernel that would not compile on the H100 fails CI here.
"""
from __future__ import annotations

import json
import sys

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

# Largest dynamic shared memory one block may use on an H100 / H200 (227 KiB).
HOPPER_SHARED_BYTES = 232448

recorded: dict[tuple, dict] = {}


_JIT_CACHE: dict = {}


def _record_launch(fn, args, kwargs) -> None:
    """Record the launch as the JIT would specialize it on a GPU (bench/sm90.py: the JIT's own
    binder, so ints == 1 become constexprs and 16-divisible pointers / ints carry tt.divisibility)."""
    from triton.runtime.jit import JITFunction

    from bench import sm90

    jit = _JIT_CACHE.get(fn)
    if jit is None:
        jit = _JIT_CACHE[fn] = JITFunction(fn)
    spec = sm90.specialize(jit, args, kwargs)
    spec["module"], spec["name"] = fn.__module__, fn.__name__
    # One specialization per kernel, argument types, alignment / ==1 specialization and dtype constexprs.
    key = (fn.__module__, fn.__name__, tuple(sorted(spec["signature"].items())),
           tuple(sorted(spec["attrs"])),
           tuple(sorted((k, str(v)) for k, v in spec["constexprs"].items() if isinstance(v, dict) or v == 1)))
    recorded.setdefault(key, spec)


def install_recorder() -> bool:
    """Patch the interpreter's launch to record specializations; False if not interpreting."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        try:
            _record_launch(self.fn, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        except Exception:  # recording must never change what the test itself sees
            pass
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    return True


def compile_all(specs: list[dict], arch: int = 90) -> list[str]:
    """Compile each spec for sm_`arch`; returns one error line per failure."""
    import importlib

    import triton

    from bench import sm90

    # GPU autotune configs are compiled once per kernel, on its spec with the widest element types
    # (the one that needs the most shared memory); the interpreted blocks for every spec.
    def width(spec):
        return sum(int("".join(c for c in t if c.isdigit()) or 1) for t in spec["signature"].values()
                   if t.startswith("*"))

    widest = {}
    for i, spec in enumerate(specs):
        k = (spec["module"], spec["name"])
        if k not in widest or width(spec) > width(specs[widest[k]]):
            widest[k] = i
    failures = []
    for i, spec in enumerate(specs):
        obj = getattr(importlib.import_module(spec["module"]), spec["name"])
        # The interpreted launch's own blocks, plus every GPU autotune config (never interpreted).
        variants = [dict(spec, options={"num_warps": 4, "num_stages": 3, **spec["options"]})]
        while not isinstance(obj, triton.runtime.jit.JITFunction):
            for cfg in (getattr(obj, "configs", None) or []) if widest[(spec["module"], spec["name"])] == i else []:
                variants.append(dict(spec, constexprs={**spec["constexprs"], **cfg.kwargs},
                                     options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
            obj = obj.fn  # unwrap autotune / heuristics
        for v in variants:
            where = f"{spec['module']}.{spec['name']} {v['signature']} {v['constexprs']} {v['options']}"
            try:
                kernel = sm90.compile_spec(v, arch)
                assert kernel.asm.get("cubin"), "no cubin produced"
                shared = kernel.metadata.shared
                assert shared <= HOPPER_SHARED_BYTES, f"needs {shared} B of shared memory > {HOPPER_SHARED_BYTES}"
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                failures.append(f"{where}: {type(exc).__name__}: {first}")
    return failures


if __name__ == "__main__":
    specs = json.load(open(sys.argv[1]))
    errors = compile_all(specs, int(sys.argv[2]) if len(sys.argv) > 2 else 90)
    print(json.dumps({"compiled": len(specs) - len(errors), "errors": errors}))
