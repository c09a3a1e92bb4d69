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


def recorder_layers() -> int:
    """How many recording wrappers sit on the interpreter's launch (1 once installed: a second layer
    would mean this module or conftest was imported under two names)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return 0
    n, run = 0, InterpretedFunction.run
    while getattr(run, "_hopper_aot_original", None) is not None:
        n, run = n + 1, run._hopper_aot_original
    return n


def install_recorder() -> bool:
    """Patch the interpreter's launch to record specializations; False if not interpreting.
    Installs once: a launch already wrapped by a recorder is left as it is."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    original = InterpretedFunction.run
    if getattr(original, "_hopper_aot_original", None) is not None:
        return True

    def run(self, *args, **kwargs):
        try:
            _record_launch(self.fn, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
        except Exception:  # recording must never change what the test itself sees
            pass
        return original(self, *args, **kwargs)

    run._hopper_aot_original = original
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


# ---- pinned configs: the NCE kernels at the launchers' GPU tiles, which must not spill at all ------------
# The recorded launches above carry the interpreter's small blocks (and the autotune configs of the widest
# spec); these are the bf16 / fp16 tiles the NCE launchers pick on a GPU (3 MRL levels: 128 x 128 forward,
# 128 x 64 backward), compiled with no local memory at all in the PTX (not only outside loops).

_NCE_EMB = {"x", "y", "neg", "hi", "lo", "part", "src"}
_NCE_IDS = {"ids_a_r", "ids_b_r", "ids_a_c", "ids_b_c"}
_NCE_INTS = {"stride_x", "stride_y", "N", "M", "K", "B", "D", "D0", "D1", "D2", "diag_offset", "n_per_split",
             "r0", "Cr", "c0", "Cc", "row_start", "row_end", "n_rows", "n_cols", "stride_hi", "stride_part",
             "stride_src", "stride_cm", "cm_col0"}


def _nce_spec(name: str, consts: dict, emb: str = "*bf16", warps: int | None = None, stages: int = 3,
              e: str = "*bf16") -> dict:
    from bench import sm90

    module = "embedkit._triton.nce"
    if warps is None:
        import importlib

        warps = importlib.import_module(module)._NUM_WARPS
    sig = {n: "constexpr" if n in consts else emb if n in _NCE_EMB else e if n == "e_buf"
           else "*i64" if n in _NCE_IDS else "*u8" if n == "cmask" else "i32" if n in _NCE_INTS else "*fp32"
           for n in sm90.jit_of(module, name).arg_names}
    return {"module": module, "name": name, "signature": sig, "constexprs": consts, "attrs": {},
            "options": {"num_warps": warps, "num_stages": stages}, "no_spill": True}


def pinned_specs() -> list[dict]:
    """The pinned NCE configs (needs the real compiler's kernels: call without TRITON_INTERPRET)."""
    blk = dict(BLOCK_M=64, BLOCK_D=64)
    flags = dict(HAS_IDS_A=True, HAS_IDS_B=True, HAS_DIAG=True, HAS_CAND_MASK=False, USE_TMA=False)
    # the tl.dot constexprs embedkit._triton._common.dot_args gives on a GPU (recorded form)
    bf16 = dict(DOT_DTYPE={"tl_dtype": "bf16"}, DOT_PREC="tf32")
    fp16 = dict(DOT_DTYPE={"tl_dtype": "fp16"}, DOT_PREC="tf32")
    specs = [_nce_spec("_nce_prefix_inv_norm_kernel", dict(NUM_LEVELS=3, **blk)),
             _nce_spec("_nce_row_negative_cos_kernel", dict(NUM_LEVELS=3, **blk)),
             _nce_spec("_nce_row_negative_bwd_kernel", dict(NUM_LEVELS=3, HAS_CAND_MASK=False, **blk), warps=4)]
    for aligned in (True, False):
        specs.append(_nce_spec("_nce_fwd_kernel", dict(NUM_LEVELS=3, BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, **bf16,
                                                       ALIGNED=aligned, SPLIT_FROM=128, **flags)))
        specs.append(_nce_spec("_nce_bwd_coef_kernel", dict(NUM_LEVELS=3, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64,
                                                            **bf16, ALIGNED=aligned, PARK=False, **flags)))
    specs.append(_nce_spec("_nce_fwd_kernel", dict(NUM_LEVELS=1, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, **fp16,
                                                   ALIGNED=False, SPLIT_FROM=128, **flags), emb="*fp16", warps=4))
    specs.append(_nce_spec("_nce_bwd_coef_kernel", dict(NUM_LEVELS=1, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, **fp16,
                                                        ALIGNED=False, PARK=False, **flags), emb="*fp16", e="*fp32",
                           warps=4))
    # candidate_mask (HAS_CAND_MASK): the tiles the launchers pick with a mask (3 levels: 64 x 64 forward),
    # against the targets (ids, diagonal) and the shared negatives (neither), and the own negatives' backward.
    for diag in (True, False):
        masked = dict(HAS_IDS_A=diag, HAS_IDS_B=diag, HAS_DIAG=diag, HAS_CAND_MASK=True, USE_TMA=False)
        specs.append(_nce_spec("_nce_fwd_kernel", dict(NUM_LEVELS=3, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, **bf16,
                                                       ALIGNED=True, SPLIT_FROM=128, **masked)))
        specs.append(_nce_spec("_nce_bwd_coef_kernel", dict(NUM_LEVELS=3, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64,
                                                            **bf16, ALIGNED=True, PARK=False, **masked)))
    specs.append(_nce_spec("_nce_row_negative_bwd_kernel", dict(NUM_LEVELS=3, HAS_CAND_MASK=True, **blk), warps=4))
    # TMA (USE_TMA, bf16): the 3-level forward at 128 x 64 (aligned or not) and the 1-level coefficient tile.
    tma = dict(flags, USE_TMA=True)
    for aligned in (True, False):
        specs.append(_nce_spec("_nce_fwd_kernel", dict(NUM_LEVELS=3, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, **bf16,
                                                       ALIGNED=aligned, SPLIT_FROM=128, **tma)))
    # The split 3-level 128 x 128 forward (the diagonal's tiles apart), 3 stages (Triton 3.9 keeps only those).
    for aligned in (True, False):
        specs.append(_nce_spec("_nce_fwd_kernel", dict(NUM_LEVELS=3, BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, **bf16,
                                                       ALIGNED=aligned, SPLIT_FROM=128, **tma), warps=8, stages=3))
    specs.append(_nce_spec("_nce_bwd_coef_kernel", dict(NUM_LEVELS=1, BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, **bf16,
                                                        ALIGNED=True, PARK=False, **tma)))
    for scaled in (False, True):
        specs.append(_nce_spec("_nce_acc_kernel", dict(HAS_LO=True, SCALED=scaled, BLOCK_R=32, BLOCK_C=128),
                               warps=4))
    return specs


def compile_pinned(arch: int = 90) -> tuple[int, list[str]]:
    """Compile the pinned configs for sm_`arch`: (how many, one error line per failure)."""
    from bench import sm90

    specs, failures = pinned_specs(), []
    for spec in specs:
        where = f"{spec['module']}.{spec['name']} {spec['constexprs']} {spec['options']}"
        try:
            kernel = sm90.compile_spec(spec, arch)
            assert kernel.asm.get("cubin"), "no cubin produced"
            assert ".local" not in kernel.asm["ptx"], "spills to local memory"
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            failures.append(f"{where}: {type(exc).__name__}: {first}")
    return len(specs), failures


if __name__ == "__main__":
    # hopper_aot.py SPECS.json [ARCH]: the recorded specs; hopper_aot.py --pinned [ARCH]: the pinned configs.
    arch = int(sys.argv[2]) if len(sys.argv) > 2 else 90
    if sys.argv[1] == "--pinned":
        n, errors = compile_pinned(arch)
    else:
        specs = json.load(open(sys.argv[1]))
        n, errors = len(specs), compile_all(specs, arch)
    print(json.dumps({"compiled": n - len(errors), "errors": errors}))
