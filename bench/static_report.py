"""Static sm_90a report: every Triton kernel and autotune config the launchers can pick, compiled as
the JIT would compile it on an H100 / H200, without a GPU.

    python -m bench.static_report [--quick] [--out DIR] [--jobs N]

How kernels are found: triton's JITFunction.run and Autotuner.run are patched to record (not launch)
each launch -- the autotuner's configs after its own prune function, the JIT's real specialization
(bench/sm90.py) -- and the real launchers in embedkit/_triton/ are called with CPU tensors of the
benchmark dtypes at the benchmark's head counts, head dims, max_seqlen and widths (small T / B
where they do not change the specialization). Each distinct spec is compiled once (cached on disk,
see bench/sm90.py) and its SASS read. Checks (the CI test, tests/test_static_report.py): a config
that a launcher may pick fails when it does not fit shared memory, spills inside a loop, or uses
mma.sync (HMMA) where its tile allows wgmma (M >= 64), unless waived by the kernel module's
SM90_WAIVERS.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default (and the CI test's)

import torch  # noqa: E402

from bench import sm90  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "results" / "static-sm90a"

_recorded: list[tuple[str, dict, dict]] = []   # (case label, spec, info)
_case = {"label": ""}


def install_recorder():
    import triton
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid=None, warmup=False, **kwargs):
        autotuned = kwargs.pop("_ek_autotuned", False)
        _recorded.append((_case["label"], sm90.specialize(self, args, kwargs), {"autotuned": autotuned}))
        return None

    def tuner_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else list(self.configs)
        for cfg in configs:
            self.fn.run(*args, **kwargs, **cfg.all_kwargs(), _ek_autotuned=True)
        self.nargs = None

    JITFunction.run = jit_run
    Autotuner.run = tuner_run
    return triton.__version__


# ---- the benchmark shapes ---------------------------------------------------------------------

def attention_cases(quick: bool):
    bf16 = torch.bfloat16
    Ds = (128,) if quick else (64, 128)
    groups = (4,) if quick else (1, 4)
    lens = (512,) if quick else (64, 512, 1024)
    rots = ("full",) if quick else ("off", "full", "partial")
    Hq = 16
    for D in Ds:
        for g in groups:
            for L in lens:
                for rot in rots:
                    yield (f"attention D={D} Hq={Hq} Hkv={Hq // g} max_seqlen={L} rotary={rot}",
                           lambda D=D, g=g, L=L, rot=rot: _run_attention(D, Hq, Hq // g, L, rot, bf16))


def _run_attention(D, Hq, Hkv, L, rot, dtype):
    """Both load paths: TMA descriptors (USE_TMA, what these aligned bf16 inputs get) and pointer tiles
    (what misaligned or strided inputs get; attention.TMA = False forces them here)."""
    from embedkit._triton import attention as A

    saved = A.TMA
    try:
        for tma in (True, False):
            A.TMA = tma
            _run_attention_path(A, D, Hq, Hkv, L, rot, dtype)
    finally:
        A.TMA = saved


def _run_attention_path(A, D, Hq, Hkv, L, rot, dtype):
    T = 2 * L  # two sequences of max_seqlen: T, strides and offsets keep their divisibility by 16
    q = torch.empty(T, Hq, D, dtype=dtype)
    k = torch.empty(T, Hkv, D, dtype=dtype)
    v = torch.empty(T, Hkv, D, dtype=dtype)
    cu = torch.tensor([0, L, T], dtype=torch.int32)
    rotary = None
    if rot != "off":
        R = D if rot == "full" else D // 2
        rotary = (torch.empty(T, R // 2), torch.empty(T, R // 2))
    out, lse = A.attention_fwd(q, k, v, cu, L, False, D ** -0.5, rotary)
    A.attention_bwd(torch.empty_like(out), q, k, v, out, torch.empty(Hq, T), None, cu, L, False, D ** -0.5, rotary)
    # The one-kernel backward (deterministic=False) runs where the fused-dq path does not; on descriptors too
    # when A.TMA (attention.fused_tma: not at D >= 128 with rotary).
    if not A.fuse_dq(L):
        A.attention_bwd(torch.empty_like(out), q, k, v, out, torch.empty(Hq, T), None, cu, L, False, D ** -0.5, rotary,
                        deterministic=False)


def pool_project_cases(quick: bool):
    for H in ((4096,) if quick else (1024, 4096)):
        yield (f"pool_project H={H} out_dim=768 B=64", lambda H=H: _run_pool(H))


def _run_pool(H, B=64, out_dim=768, dtype=torch.bfloat16):
    from embedkit._triton import pool_project as P

    T = B * 32
    hidden = torch.empty(T, H, dtype=dtype)
    cu = torch.arange(0, T + 1, 32, dtype=torch.int32)
    weight = torch.empty(3072, H, dtype=dtype)
    bias = torch.empty(3072, dtype=dtype)
    out, pooled, counts, y, inv = P.pool_project_fwd(hidden, cu, weight, bias, None, out_dim, True)
    P.pool_project_bwd(torch.empty_like(out), pooled, counts, y, inv, (T, H), dtype, cu, weight, True, None, True)


def nce_cases(quick: bool):
    for D in ((3072,) if quick else (768, 3072)):
        for levels in ((1, 3) if not quick else (3,)):
            dims = (D,) if levels == 1 else tuple(d for d in (768, 1536, 3072) if d <= D)[-3:]
            if len(dims) < levels:
                dims = (D // 4, D // 2, D)
            yield (f"nce D={D} levels={dims}", lambda D=D, dims=dims: _run_nce(D, dims))
            yield (f"nce D={D} levels={dims} candidate_mask", lambda D=D, dims=dims: _run_nce(D, dims, mask=True))


def _run_nce(D, dims, B=256, dtype=torch.bfloat16, mask=False):
    from embedkit._triton import nce as N

    q = torch.empty(B, D, dtype=dtype)
    t = torch.empty(B, D, dtype=dtype)
    ids = torch.empty(B, dtype=torch.int64)
    inv_temp = torch.ones(1)
    cm = dict(cand_mask=torch.ones(B, B, dtype=torch.bool)) if mask else {}
    res = N.nce_fwd(q, t, None, None, ids, None, ids, None, 0, inv_temp, dims, **cm)
    lse, pos, es, inv_r, inv_c, inv_s, inv_n, row_cos = res
    g = torch.empty(len(dims), B)
    N.nce_bwd(g, q, t, None, None, ids, None, ids, None, 0, inv_temp, dims, lse, pos, inv_r, inv_c, inv_s, inv_n,
              row_cos, **cm)


def ci_cases():
    """The CI test's subset: one case per op that still reaches every kernel (GQA, partial rotary, 3
    MRL levels), a few dozen specializations."""
    bf16 = torch.bfloat16
    yield ("attention D=64 Hq=8 Hkv=2 max_seqlen=64 rotary=partial",
           lambda: _run_attention(64, 8, 2, 64, "partial", bf16))
    yield ("pool_project H=1024 out_dim=768 B=64", lambda: _run_pool(1024))
    yield ("nce D=768 levels=(192, 384, 768)", lambda: _run_nce(768, (192, 384, 768)))


def all_cases(quick: bool, ops=None, ci: bool = False):
    if ci:
        yield from ((label, fn) for label, fn in ci_cases() if not ops or label.split()[0] in ops)
        return
    gens = {"attention": attention_cases, "pool_project": pool_project_cases, "nce": nce_cases}
    for op, gen in gens.items():
        if ops and op not in ops:
            continue
        yield from gen(quick)


# ---- checks -----------------------------------------------------------------------------------

def _waivers(module: str) -> list[dict]:
    return list(getattr(importlib.import_module(module), "SM90_WAIVERS", []) or [])


def _config_of(spec: dict) -> dict:
    cfg = {k: v for k, v in spec["constexprs"].items() if not isinstance(v, dict)}
    cfg.update({"num_warps": spec["options"].get("num_warps", 4), "num_stages": spec["options"].get("num_stages", 3)})
    return cfg


def waived(spec: dict, check: str) -> str | None:
    cfg = _config_of(spec)
    for w in _waivers(spec["module"]):
        if w.get("kernel") == spec["name"] and w.get("check") == check and \
                all(cfg.get(k) == v for k, v in (w.get("match") or {}).items()):
            return w.get("reason", "waived")
    return None


def _mma_m(spec: dict) -> int | None:
    """The M of the kernel's tiles (the dot rows): BLOCK_M where the kernel has one."""
    c = spec["constexprs"]
    for k in ("BLOCK_M", "BLOCK_T"):
        if isinstance(c.get(k), int):
            return c[k]
    return None


def checks(spec: dict, fig: dict) -> list[dict]:
    """Failures of one compiled spec: [{check, detail, waived}]."""
    out = []
    if "error" in fig:
        return [{"check": "compile", "detail": fig["error"], "waived": None}]
    if fig["shared_bytes"] > sm90.SM90_SMEM_PER_BLOCK:
        out.append({"check": "smem", "detail": f"{fig['shared_bytes']} B > {sm90.SM90_SMEM_PER_BLOCK} B"})
    if fig["stl_in_loop"] or fig["ldl_in_loop"]:
        out.append({"check": "spill", "detail": f"{fig['stl_in_loop']} STL / {fig['ldl_in_loop']} LDL inside loops"})
    m = _mma_m(spec)
    if fig["hmma"] and not fig["hgmma"] and (m is None or m >= 64):
        out.append({"check": "wgmma", "detail": f"{fig['hmma']} HMMA, 0 HGMMA with M={m}"})
    for f in out:
        f["waived"] = waived(spec, f["check"])
    return out


# ---- report -----------------------------------------------------------------------------------

def build(quick: bool, ops=None, progress=print, ci: bool = False) -> dict:
    tv = install_recorder()
    t0 = time.time()
    case_errors = {}
    for label, fn in all_cases(quick, ops, ci):
        _case["label"] = label
        try:
            fn()
        except Exception as exc:  # a launcher whose signature changed: reported, not fatal
            case_errors[label] = f"{type(exc).__name__}: {exc}"[:300]
            progress(f"[static] launcher failed for {label}: {case_errors[label]}")
    specs, cases_of = {}, {}
    for label, spec, info in _recorded:
        key = sm90.spec_key(spec)
        specs.setdefault(key, (spec, info))
        cases_of.setdefault(key, []).append(label)
    progress(f"[static] {len(_recorded)} launches recorded, {len(specs)} distinct specializations")
    entries = []
    for i, (key, (spec, info)) in enumerate(specs.items()):
        t = time.time()
        fig = sm90.compile_and_analyze(spec)
        fails = checks(spec, fig)
        entries.append({"key": key, "kernel": f"{spec['module']}.{spec['name']}", "config": _config_of(spec),
                        "autotuned": info["autotuned"], "spec": spec, "figures": fig, "failures": fails,
                        "cases": sorted(set(cases_of[key]))})
        progress(f"[static] {i + 1}/{len(specs)} {spec['name']} {_short_cfg(_config_of(spec))} "
                 f"({time.time() - t:.1f}s)" + (f" FAIL {[f['check'] for f in fails]}" if fails else ""))
    return {"triton": tv, "torch": torch.__version__, "target": "cuda sm_90a (GPUTarget('cuda', 90, 32))",
            "quick": quick, "seconds": round(time.time() - t0, 1), "case_errors": case_errors, "entries": entries}


def _short_cfg(cfg: dict) -> str:
    keep = [k for k in cfg if k.startswith("BLOCK") or k in ("num_warps", "num_stages", "HEAD_DIM", "NUM_LEVELS",
                                                            "ROTARY", "GROUP", "FUSED_DQ")]
    return " ".join(f"{k}={cfg[k]}" for k in keep)


def markdown(rep: dict) -> str:
    lines = ["# Static sm_90a report (no GPU: compiled with the JIT's real specialization, SASS read with "
             "cuobjdump)", "",
             f"Triton {rep['triton']}, torch {rep['torch']}, target {rep['target']}"
             f"{', quick subset' if rep['quick'] else ''}. Static estimates, not measurements. "
             "Spill bytes = bytes of the STL / LDL instructions in the SASS; 'in loop' = inside a "
             "backward branch. CTAs/SM from H100 limits (64K regs, 228 KiB smem, 2048 threads). "
             "wgmma = HGMMA instructions, mma.sync = HMMA. LDG128 = LDG.E.128; cp.async = LDGSTS (128-bit); "
             "TMA = UTMALDG.", ""]
    fails = [(e, f) for e in rep["entries"] for f in e["failures"]]
    open_f = [(e, f) for e, f in fails if not f["waived"]]
    lines += [f"**{len(rep['entries'])} specializations; {len(open_f)} unwaived failures, "
              f"{len(fails) - len(open_f)} waived.**", ""]
    if rep["case_errors"]:
        lines += ["Launchers that could not be driven:", ""] + [f"- {k}: {v}" for k, v in rep["case_errors"].items()]
        lines.append("")
    lines += ["| kernel | config | regs | spill st/ld B | STL/LDL in loop | smem B | CTAs/SM | HGMMA | HMMA | "
              "LDG128 | LDG narrow | cp.async128 | TMA | failures |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(rep["entries"], key=lambda e: (e["kernel"], _short_cfg(e["config"]))):
        f = e["figures"]
        fl = "; ".join(x["check"] + ("(waived)" if x["waived"] else "") for x in e["failures"])
        if "error" in f:
            lines.append(f"| {e['kernel'].split('.')[-1]} | {_short_cfg(e['config'])} | compile error: "
                         f"{f['error'][:80]} |||||||||||| {fl} |")
            continue
        lines.append(f"| {e['kernel'].split('.')[-1]} | {_short_cfg(e['config'])} | {f['registers']} | "
                     f"{f['spill_store_bytes']}/{f['spill_load_bytes']} | {f['stl_in_loop']}/{f['ldl_in_loop']} | "
                     f"{f['shared_bytes']} | {f['ctas_per_sm']} ({f['occupancy_limited_by']}) | {f['hgmma']} | "
                     f"{f['hmma']} | {f['ldg_128']} | {f['ldg_narrow']} | {f['ldgsts_128']} | {f['utmaldg']} | {fl} |")
    lines += ["", "## Unwaived failures", ""]
    for e, f in open_f:
        lines.append(f"- `{e['kernel']}` {_short_cfg(e['config'])}: **{f['check']}** {f.get('detail', '')} "
                     f"(cases: {', '.join(e['cases'][:3])}{' ...' if len(e['cases']) > 3 else ''})")
    return "\n".join(lines) + "\n"


def _op_of(entry: dict) -> str:
    return entry["kernel"].rsplit(".", 2)[-2]  # embedkit._triton.<op>.<kernel>


def merge_reports(old: dict, new: dict, ops: list[str]) -> dict:
    """`new` (a rebuild of `ops` only) with `old`'s entries for every other op, so that one op's kernel
    edit does not need the whole report recompiled. Refused across Triton versions (figures differ)."""
    if old.get("triton") != new["triton"] or old.get("quick") != new["quick"]:
        raise SystemExit(f"--merge: {old.get('triton')} / quick={old.get('quick')} report cannot take a "
                         f"{new['triton']} / quick={new['quick']} rebuild")
    kept = [e for e in old["entries"] if _op_of(e) not in ops]
    errors = {k: v for k, v in old.get("case_errors", {}).items() if k.split(" ")[0].split(":")[0] not in ops}
    return {**new, "seconds": round(old.get("seconds", 0) + new["seconds"], 1), "entries": kept + new["entries"],
            "case_errors": {**errors, **new["case_errors"]}, "merged_ops": sorted(ops)}


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench.static_report compiles real kernels: run it without TRITON_INTERPRET=1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset of shapes")
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--op", action="append", help="attention / pool_project / nce (default all)")
    ap.add_argument("--ci", action="store_true", help="the CI test's smaller subset (one case per op)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when there are unwaived failures")
    ap.add_argument("--merge", action="store_true",
                    help="with --op: keep the other ops' entries of the report already in --out")
    a = ap.parse_args(argv)
    rep = build(a.quick, a.op, ci=a.ci)
    out = Path(a.out)
    if a.merge and a.op and (out / "report.json").exists():
        rep = merge_reports(json.loads((out / "report.json").read_text()), rep, a.op)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    (out / "report.md").write_text(markdown(rep))
    n_open = sum(1 for e in rep["entries"] for f in e["failures"] if not f["waived"])
    print(f"[static] wrote {out}/report.md and report.json: {len(rep['entries'])} specializations, "
          f"{n_open} unwaived failures, {rep['seconds']} s")
    return 1 if (a.strict and (n_open or rep["case_errors"])) else 0


if __name__ == "__main__":
    sys.exit(main())
