"""Compile Triton kernels for sm_90a exactly as the JIT would, without a GPU, and read their SASS.

`specialize` runs the JIT's own binder (triton.runtime.jit.create_function_from_signature +
JITFunction._pack_args, present in Triton 3.6 and 3.9) on the real launch arguments, so integers
equal to 1 become constexprs and pointers / integers divisible by 16 carry tt.divisibility=16, as
on a GPU. Where that API is missing, the same rules are applied by hand (`_manual_spec`). The
result is a JSON-able spec; `compile_spec` turns it back into an ASTSource and a cubin, and
`analyze` reads registers, shared memory, spills (and the spills inside loops), wgmma vs mma.sync,
128-bit / cp.async / TMA loads from the SASS (cuobjdump, shipped with Triton or in CUDA).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int32": "i32",
           "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

# H100 / H200 (sm_90) per-SM limits.
SM90_REGS_PER_SM = 65536
SM90_SMEM_PER_SM = 233472          # 228 KiB
SM90_SMEM_PER_BLOCK = 232448       # 227 KiB usable by one block
SM90_THREADS_PER_SM = 2048
SM90_BLOCKS_PER_SM = 32
ANALYZER_VERSION = 3  # bump when analyze() changes: part of the cache key


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def _encode(v):
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return {"tl_dtype": str(v)}
    if isinstance(v, (int, float, bool, str, type(None))):
        return v
    if hasattr(v, "value") and isinstance(v.value, (int, float, bool, str, type(None))):  # tl.constexpr
        return v.value
    raise TypeError(f"cannot record constexpr value {v!r}")


def _decode(v):
    import triton.language as tl

    return tl.dtype(v["tl_dtype"]) if isinstance(v, dict) and "tl_dtype" in v else v


def _manual_spec(jit, args, kwargs):
    """The JIT's specialization rules, by hand (fallback for a Triton without the binder API)."""
    import inspect

    import torch

    params = list(inspect.signature(jit.fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        v = bound.get(p.name, p.default)
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        nospec = i in getattr(jit, "do_not_specialize", ()) or p.name in getattr(jit, "do_not_specialize", ())
        if "constexpr" in ann or v is None:
            signature[p.name], constexprs[p.name] = "constexpr", _encode(v)
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _DTYPES[str(v.dtype).replace("torch.", "")]
            if v.data_ptr() % 16 == 0:
                attrs[p.name] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not nospec:
                signature[p.name], constexprs[p.name] = "constexpr", 1
                continue
            signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else ("u64" if v >= 2 ** 63 else "i64")
            if v % 16 == 0 and not nospec:
                attrs[p.name] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"cannot specialize argument {p.name}={v!r}")
    return signature, constexprs, attrs


def specialize(jit, args, kwargs) -> dict:
    """JSON-able spec of one launch of `jit` (a JITFunction) with these arguments, as the JIT sees it."""
    opts = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs and kwargs[k] is not None}
    call_kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    names = [p.name for p in jit.params] if hasattr(jit, "params") else None
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(_target())
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound_args, specialization, options = binder(*args, **call_kw)
        _, sig, cexprs, attrs = jit._pack_args(backend, call_kw, bound_args, specialization, options)
        constexprs = {names[k[0]]: _encode(v) for k, v in cexprs.items() if len(k) == 1}
        attrs = {names[k[0]]: v for k, v in attrs.items() if len(k) == 1 and v}
        signature = dict(sig)
        how = "jit-binder"
    except (ImportError, AttributeError, TypeError):
        signature, constexprs, attrs = _manual_spec(jit, args, call_kw)
        how = "manual"
    return {"module": jit.fn.__module__, "name": jit.fn.__name__, "signature": signature,
            "constexprs": constexprs, "attrs": attrs, "options": opts, "how": how}


def jit_of(module: str, name: str):
    import importlib

    import triton

    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, triton.runtime.jit.JITFunction):
        obj = obj.fn
    return obj


def spec_key(spec: dict) -> str:
    import triton

    jit = jit_of(spec["module"], spec["name"])
    blob = json.dumps([ANALYZER_VERSION, jit.cache_key, spec["signature"], spec["constexprs"], spec["attrs"], spec["options"],
                       triton.__version__], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def compile_spec(spec: dict, arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = jit_of(spec["module"], spec["name"])
    names = jit.arg_names
    constexprs = {(names.index(k),): _decode(v) for k, v in spec["constexprs"].items()}
    attrs = {(names.index(k),): v for k, v in spec.get("attrs", {}).items()}
    src = ASTSource(fn=jit, signature=spec["signature"], constexprs=constexprs, attrs=attrs)
    options = {"num_warps": 4, "num_stages": 3, **spec["options"]}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str) -> str:
    for cand in (os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/" + name,):
        if os.path.exists(cand):
            return cand
    try:
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if cand.exists():
            return str(cand)
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (CUDA toolkit or triton/backends/nvidia/bin)")
    return found


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


def _width(op: str) -> int:
    m = re.search(r"\.(64|128|U8|S8|U16|S16)\b", op)
    return {"64": 8, "128": 16, "U8": 1, "S8": 1, "U16": 2, "S16": 2}.get(m.group(1), 4) if m else 4


def _is_ldg(op: str) -> bool:
    return op == "LDG" or op.startswith("LDG.")  # not LDGSTS / LDGDEPBAR


def analyze_sass(text: str) -> dict:
    insns = []
    for m in _INSN.finditer(text):
        insns.append((int(m.group(1), 16), m.group(3), m.group(4)))
    # Backward branches: [target, branch address]. Not the return jumps of the out-of-line stubs ptxas puts
    # after the last EXIT (e.g. TMA / mbarrier wait retries): those jump back into the body from past its
    # end and would make everything from their target on look like a loop.
    last_exit = max((a for a, op, _ in insns if op == "EXIT"), default=None)
    loops = []
    for addr, op, rest in insns:
        if op.startswith("BRA") or op.startswith("JMP"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) <= addr:
                target = int(t.group(1), 16)
                if last_exit is not None and addr > last_exit and target < last_exit:
                    continue
                loops.append((target, addr))

    def in_loop(a):
        return any(lo <= a <= hi for lo, hi in loops)

    ops = [op for _, op, _ in insns]
    stl = [(a, op) for a, op, _ in insns if op.startswith("STL")]
    ldl = [(a, op) for a, op, _ in insns if op.startswith("LDL")]
    return {
        "instructions": len(insns), "loops": len(loops),
        "spill_store_bytes": sum(_width(op) for _, op in stl), "spill_load_bytes": sum(_width(op) for _, op in ldl),
        "stl": len(stl), "ldl": len(ldl),
        "stl_in_loop": sum(in_loop(a) for a, _ in stl), "ldl_in_loop": sum(in_loop(a) for a, _ in ldl),
        "hgmma": sum(op.startswith("HGMMA") for op in ops), "hmma": sum(op.startswith("HMMA") for op in ops),
        "ldg_128": sum(_is_ldg(op) and ".128" in op for op in ops),
        "ldg_narrow": sum(_is_ldg(op) and ".128" not in op for op in ops),
        "ldgsts_128": sum(op.startswith("LDGSTS") and ".128" in op for op in ops),
        "ldgsts": sum(op.startswith("LDGSTS") for op in ops),
        "utmaldg": sum(op.startswith("UTMALDG") for op in ops),
        "stg_128": sum(op.startswith("STG") and ".128" in op for op in ops),
    }


def ctas_per_sm(regs: int, smem: int, threads: int) -> dict:
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256  # allocation granularity 256 regs / warp
    warps = (threads + 31) // 32
    by_regs = SM90_REGS_PER_SM // max(1, regs_per_warp * warps)
    by_smem = SM90_SMEM_PER_SM // (smem + 1024) if smem else SM90_BLOCKS_PER_SM  # 1 KiB reserved / block
    by_threads = SM90_THREADS_PER_SM // threads
    n = min(by_regs, by_smem, by_threads, SM90_BLOCKS_PER_SM)
    limit = min((("regs", by_regs), ("smem", by_smem), ("threads", by_threads)), key=lambda x: x[1])[0]
    return {"ctas_per_sm": n, "occupancy_limited_by": limit}


def analyze(kernel) -> dict:
    md = kernel.metadata
    num_warps = md.num_warps
    text = sass(kernel.asm["cubin"])
    res = analyze_sass(text)
    regs = getattr(kernel, "n_regs", None)
    m = re.search(r"REG:(\d+)", _res_usage(kernel.asm["cubin"]))
    if m:
        regs = int(m.group(1))
    out = {"registers": regs, "shared_bytes": md.shared, "num_warps": num_warps,
           "num_stages": getattr(md, "num_stages", None), **res}
    out.update(ctas_per_sm(regs or 0, md.shared, 32 * num_warps))
    return out


def _res_usage(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True).stdout


def cache_dir() -> Path:
    d = Path(os.environ.get("EMBEDKIT_STATIC_CACHE", Path.home() / ".cache" / "embedkit-static"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_and_analyze(spec: dict) -> dict:
    """Figures of one spec, cached on disk by (kernel source, signature, specialization, options,
    triton version)."""
    path = cache_dir() / f"{spec_key(spec)}.json"
    if path.exists():
        return json.loads(path.read_text())
    try:
        fig = analyze(compile_spec(spec))
    except Exception as exc:  # a config that does not compile is a finding, not a crash
        msg = str(exc).strip().splitlines()
        fig = {"error": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]}
    path.write_text(json.dumps(fig))
    return fig
