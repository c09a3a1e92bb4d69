"""Ahead-of-time compilation of the Triton kernels for Hopper (sm_90), with no GPU.

The interpreter runs kernels as Python and accepts code that the real compiler rejects (types,
layouts, unsupported ops). While the test suite runs kernels under TRITON_INTERPRET=1, `record`
notes the argument types and constexprs of every launch; `compile_all` (run in a subprocess
without the interpreter) compiles one specialization per (kernel, argument types) to a cubin for
sm_90, so a kernel that would not compile on the H100 fails CI here.
"""
from __future__ import annotations

import inspect
import json
import sys

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int32": "i32",
           "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

# Largest dynamic shared memory one block may use on an H100 / H200 (227 KiB).
HOPPER_SHARED_BYTES = 232448

recorded: dict[tuple, dict] = {}


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return "constexpr" in (ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann)))


def _is_tl_dtype(v) -> bool:
    try:
        import triton.language as tl
    except ImportError:
        return False
    return isinstance(v, tl.dtype)


def _constexpr_values(constexprs: dict) -> dict:
    import triton.language as tl

    return {k: tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v for k, v in constexprs.items()}


def _record_launch(fn, args, kwargs) -> None:
    import torch

    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
    signature, constexprs = {}, {}
    for p in params:
        if p.name not in bound:
            if p.default is inspect.Parameter.empty:
                return  # an argument we cannot see: skip rather than guess
            bound[p.name] = p.default
        v = bound[p.name]
        if _is_constexpr(p):
            if _is_tl_dtype(v):
                v = {"tl_dtype": str(v)}  # rebuilt as triton.language.dtype in the compiling process
            elif not isinstance(v, (int, float, bool, str, type(None))):
                return
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _DTYPES[str(v.dtype).replace("torch.", "")]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        elif v is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = None
        else:
            return
    options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
    # One specialization per kernel, pointer/scalar types and dtype-valued constexprs.
    dtype_constexprs = tuple(sorted((k, v["tl_dtype"]) for k, v in constexprs.items() if isinstance(v, dict)))
    key = (fn.__module__, fn.__name__, tuple(sorted((k, v) for k, v in signature.items() if v != "constexpr")),
           dtype_constexprs)
    recorded.setdefault(key, {"module": fn.__module__, "name": fn.__name__, "signature": signature,
                              "constexprs": constexprs, "options": options})


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
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
        base = _constexpr_values(spec["constexprs"])
        variants = [(base, {"num_warps": 4, "num_stages": 3, **spec["options"]})]
        while not isinstance(obj, triton.runtime.jit.JITFunction):
            for cfg in (getattr(obj, "configs", None) or []) if widest[(spec["module"], spec["name"])] == i else []:
                variants.append(({**base, **cfg.kwargs},
                                 {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
            obj = obj.fn  # unwrap autotune / heuristics
        for constexprs, options in variants:
            where = f"{spec['module']}.{spec['name']} {spec['signature']} {constexprs} {options}"
            try:
                src = ASTSource(fn=obj, signature=spec["signature"], constexprs=constexprs)
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
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
