"""varlen_attention: forward, backward and forward+backward TFLOP/s against the other ways to run
attention over packed sequences, in the same run.

FLOPs follow flash-attn's convention (the design's): forward = sum over sequences of
4 * len^2 * Hq * D (halved when causal), backward = 2.5 x forward. Padded implementations are
charged the same useful FLOPs, so every TFLOP/s figure is comparable ("effective").

GPU (bf16; head dim 64 and 128; Hq = 16 with Hkv = 16 and 4) on three length mixes:
  (a) short:  8192 sequences of 16-64 tokens (uniform)
  (b) medium: lengths uniform in 64-1024, 64K tokens in all
  (c) long:   8 sequences of 4K-16K tokens (an interleaved multimodal document mix)
Competitors, each in try/except with a note when unavailable:
  - torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside), where the installed torch has it;
  - scaled_dot_product_attention on the padded batch, flash / cuDNN / efficient backends (kernel
    time on pre-padded tensors; the pad + unpad copies a packed pipeline would add are recorded
    separately as impl "pad+unpad copies"); flash takes no key-padding mask, so it runs unmasked
    (same work, padded outputs differ);
  - FlexAttention with a document mask, compiled (BlockMask build time recorded separately);
  - flash-attn's flash_attn_varlen_func, when installed.
embedkit's VARIANTS run beside its default row in the same case (the atomic backward,
deterministic=False; full and partial rotary), each with its speedup over the default: the cost of
rotary, and the one-kernel backward's gain.
CPU: a tiny case with the reference and padded SDPA only (the interpreter is never timed).
Floors per pass: the FLOPs above, and the bytes that must move -- forward reads q, k, v and writes o;
backward reads q, k, v, o, do and writes dq, dk, dv (lse / delta rows are negligible).
Speedup (bench/harness.py's one definition): embedkit's row carries speedup_vs_<competitor> = the
competitor's time / embedkit's time in the same pass (> 1: embedkit is faster); on CPU, the reference's
row against padded SDPA.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import embedkit

from .harness import BenchRun

OP = "attention"
PASSES = ("fwd", "bwd", "fwd+bwd")

# FA3-class anchors from the literature: context for the report, never measured rows (not run here,
# other shapes and machines). Sources:
#  - Shah et al., "FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision",
#    arXiv:2407.08608 (2024), abstract: H100, 1.5-2.0x over FlashAttention-2, FP16 forward up to
#    740 TFLOP/s (75% utilization), FP8 close to 1.2 PFLOP/s; FlashAttention-2 reaches ~35% on H100.
#  - pytorch/benchmark PR #2391 (tritonbench flash_attention, D 128, Hq 16, B * S = 16K, H100):
#    flash_v3 forward 430 TFLOP/s at S = 512 up to 621 TFLOP/s at S = 16K.
LITERATURE_ANCHORS = [
    {"what": "FlashAttention-3 forward, FP16, H100 SXM, peak point", "tflops": 740, "utilization": 0.75,
     "source": "Shah et al. 2024, arXiv:2407.08608 (abstract)"},
    {"what": "FlashAttention-3 forward, FP8, H100 SXM, peak point", "tflops": 1200, "utilization": None,
     "source": "Shah et al. 2024, arXiv:2407.08608 (abstract)"},
    {"what": "FlashAttention-2 on H100 (for scale)", "tflops": None, "utilization": 0.35,
     "source": "Shah et al. 2024, arXiv:2407.08608 (abstract)"},
    {"what": "FlashAttention-3 forward, D 128, Hq 16, S 512 / 16K (B * S = 16K), H100", "tflops": "430 / 621",
     "utilization": None, "source": "pytorch/benchmark PR #2391 (tritonbench flash_attention)"},
]


def literature_notes() -> list[str]:
    """The anchors as report notes, each labelled "literature, not measured"."""
    out = []
    for a in LITERATURE_ANCHORS:
        fig = [f"{a['tflops']} TFLOP/s"] if a["tflops"] is not None else []
        if a["utilization"] is not None:
            fig.append(f"{a['utilization']:.0%} of peak")
        out.append(f"literature, not measured: {a['what']}: {', '.join(fig)} ({a['source']})")
    return out


def _mix(name: str, gen: torch.Generator, quick: bool) -> list[int]:
    if name == "a":
        return torch.randint(16, 65, (2048 if quick else 8192,), generator=gen).tolist()
    if name == "b":
        total, out = (16384 if quick else 65536), []
        while sum(out) < total:
            out.append(int(torch.randint(64, 1025, (1,), generator=gen)))
        out[-1] -= sum(out) - total
        return [n for n in out if n > 0]
    if name == "c":
        return torch.randint(4096, 16385, (2 if quick else 8,), generator=gen).tolist()
    if name == "tiny":
        return torch.randint(8, 65, (16,), generator=gen).tolist()
    raise ValueError(name)


def _flops(lens, Hq, D, causal):
    fwd = sum(4.0 * n * n * Hq * D for n in lens) / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


def _padded(x: torch.Tensor, cu: torch.Tensor, lens: list[int], max_len: int) -> torch.Tensor:
    """[T, H, D] -> [B, H, max_len, D] (zeros past each sequence's end)."""
    batch = embedkit.PackedBatch(cu, max_len)
    return batch.pad(x).transpose(1, 2).contiguous()


class _Case:
    def __init__(self, lens, Hq, Hkv, D, dtype, device, causal=False):
        self.lens, self.Hq, self.Hkv, self.D, self.causal = lens, Hq, Hkv, D, causal
        T = sum(lens)
        self.T, self.max_len = T, max(lens)
        self.cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        mk = lambda h: torch.randn(T, h, D, device=device, dtype=dtype, generator=g)  # noqa: E731
        self.q, self.k, self.v = (mk(h).requires_grad_() for h in (Hq, Hkv, Hkv))
        self.grad = mk(Hq)

    def leaves(self):
        return self.q, self.k, self.v


def _time_passes(bench: BenchRun, fwd, inputs, grad_fn):
    """(fwd ms, bwd ms, fwd+bwd ms) of a differentiable fwd(); backward timed on a retained graph."""
    with torch.no_grad():
        ms_f = bench.time_ms(fwd)
    out = fwd()
    grad = grad_fn(out)
    ms_b = bench.time_ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True))

    def fwd_bwd():
        o = fwd()
        torch.autograd.grad(o, inputs, grad)

    ms_fb = bench.time_ms(fwd_bwd)
    return ms_f, ms_b, ms_fb


def _floor_bytes(T: int, Hq: int, Hkv: int, D: int, elem: int) -> dict:
    fwd = T * D * elem * (2 * Hq + 2 * Hkv)
    bwd = T * D * elem * (4 * Hq + 4 * Hkv)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _record_all(bench, case_dict, impl, flops, times, **extra):
    elem = torch.empty(0, dtype=getattr(torch, case_dict["dtype"])).element_size()
    floor = _floor_bytes(case_dict["T"], case_dict["Hq"], case_dict["Hkv"], case_dict["D"], elem)
    for name, ms in zip(PASSES, times):
        bench.record(OP, {**case_dict, "pass": name}, impl, ms=ms, flops=flops[name], floor_bytes=floor[name],
                     **extra)


def _embedkit_impl(c: _Case, backend: str, *, deterministic: bool = True, rotary_dim: int = 0):
    """embedkit's varlen_attention on the case; rotary_dim > 0 adds rotate-half rotary on the first
    rotary_dim dims (tables from each token's position in its sequence, built once, outside the timing)."""
    rotary = None
    if rotary_dim:
        pos = torch.cat([torch.arange(n, device=c.q.device) for n in c.lens])
        rotary = embedkit.rotary_tables(pos, rotary_dim)

    def fwd():
        with embedkit.use_backend(backend):
            return embedkit.varlen_attention(c.q, c.k, c.v, c.cu, c.max_len, causal=c.causal, rotary=rotary,
                                             deterministic=deterministic)
    return fwd, c.leaves(), lambda out: c.grad


# embedkit's own variants, measured beside its default row in the same case: the atomic one-kernel
# backward (deterministic=False, flash-attn 2's default and so what its drop-ins run), full rotary and
# partial rotary (half the head dim). Their speedup_vs_embedkit-triton is the variant's cost (issue
# target: rotary within 15%, i.e. >= 0.87; partial as full).
VARIANTS = {
    "embedkit-triton-atomic": {"deterministic": False},
    "embedkit-triton-rotary": {"rotary_dim": "D"},
    "embedkit-triton-rotary-half": {"rotary_dim": "D/2"},
}


def _variant_impl(c: _Case, backend: str, name: str):
    kw = dict(VARIANTS[name])
    if "rotary_dim" in kw:
        kw["rotary_dim"] = c.D if kw["rotary_dim"] == "D" else c.D // 2
    return _embedkit_impl(c, backend, **kw)


def _varlen_attn_impl(c: _Case, bench: BenchRun):
    from torch.nn.attention.varlen import varlen_attn

    k, v = c.k, c.v
    kwargs = {}
    if c.Hkv != c.Hq:
        kwargs["enable_gqa"] = True
    if c.causal:
        kwargs["window_size"] = (-1, 0)

    def fwd():
        return varlen_attn(c.q, k, v, c.cu, c.cu, c.max_len, c.max_len, **kwargs)

    try:
        with torch.no_grad():
            fwd()
    except TypeError:  # an older torch without enable_gqa: expand the kv heads (outside the timing)
        kwargs.pop("enable_gqa", None)
        group = c.Hq // c.Hkv
        k = c.k.detach().repeat_interleave(group, 1).requires_grad_()
        v = c.v.detach().repeat_interleave(group, 1).requires_grad_()
        bench.note("varlen_attn has no enable_gqa in this torch: kv heads expanded before timing")
    return fwd, (c.q, k, v), lambda out: c.grad


def _sdpa_impl(c: _Case, backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend_name]
    qp, kp, vp = (_padded(x.detach(), c.cu, c.lens, c.max_len).requires_grad_() for x in c.leaves())
    mask = None
    if backend_name != "flash":  # key-padding mask [B, 1, 1, L] (flash takes none: it runs unmasked)
        idx = torch.arange(c.max_len, device=c.cu.device)
        lens = (c.cu[1:] - c.cu[:-1]).long()
        mask = (idx[None, :] < lens[:, None])[:, None, None, :]
        if c.causal:
            mask = mask & torch.ones(c.max_len, c.max_len, dtype=torch.bool, device=mask.device).tril()
    gqa = c.Hq != c.Hkv
    grad = _padded(c.grad, c.cu, c.lens, c.max_len)

    def fwd():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=gqa,
                                                  is_causal=c.causal and mask is None)
    return fwd, (qp, kp, vp), lambda out: grad


def _flex_impl(c: _Case, bench: BenchRun, case_dict):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = c.T
    doc = torch.repeat_interleave(torch.arange(len(c.lens), device=c.cu.device),
                                  (c.cu[1:] - c.cu[:-1]).long(), output_size=T)
    causal = c.causal

    def document_mask(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    build = lambda: create_block_mask(document_mask, None, None, T, T, device=c.cu.device, _compile=True)  # noqa
    block_mask = build()
    t_build = bench.time_ms(build)
    bench.record(OP, {**case_dict, "pass": "blockmask-build"}, "flex-attention", ms=t_build)
    flex = torch.compile(flex_attention, dynamic=False)
    qf, kf, vf = (x.detach().transpose(0, 1)[None].requires_grad_() for x in c.leaves())  # [1, H, T, D]
    grad = c.grad.transpose(0, 1)[None]

    def fwd():
        return flex(qf, kf, vf, block_mask=block_mask, enable_gqa=c.Hq != c.Hkv)
    return fwd, (qf, kf, vf), lambda out: grad


def _flash_attn_impl(c: _Case):
    from flash_attn import flash_attn_varlen_func

    def fwd():
        return flash_attn_varlen_func(c.q, c.k, c.v, c.cu, c.cu, c.max_len, c.max_len, causal=c.causal)
    return fwd, c.leaves(), lambda out: c.grad


def _run_impl(bench, case_dict, impl, flops, make):
    try:
        fwd, inputs, grad_fn = make()
        times = _time_passes(bench, fwd, inputs, grad_fn)
    except Exception as exc:  # a competitor missing or failing must not stop the run: say so
        bench.note(f"{impl} unavailable for {case_dict}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return None
    _record_all(bench, case_dict, impl, flops, times)
    return times


def _pad_copies(bench, c: _Case, case_dict):
    batch = embedkit.PackedBatch(c.cu, c.max_len)

    def copies():
        padded = [batch.pad(x.detach()).transpose(1, 2).contiguous() for x in c.leaves()]
        return batch.unpad(padded[0].transpose(1, 2))

    bench.record(OP, {**case_dict, "pass": "fwd"}, "pad+unpad copies", ms=bench.time_ms(copies))


def run(bench: BenchRun, *, mixes: list[str] | None = None, head_dims: list[int] | None = None,
        variant_cases: list[tuple[str, int]] | None = None) -> None:
    """mixes / head_dims narrow the GPU cases (bench/gpu_check.py runs the headline ones); variant_cases
    the (mix, D) cases that also time embedkit's VARIANTS (None: every case)."""
    dev = bench.device
    gen = torch.Generator().manual_seed(0)
    if not bench.on_gpu:
        lens = _mix("tiny", gen, True)
        c = _Case(lens, 4, 2, 64, torch.float32, dev)
        case = {"mix": "tiny", "B": len(lens), "T": c.T, "D": 64, "Hq": 4, "Hkv": 2, "dtype": "float32"}
        flops = _flops(lens, 4, 64, False)
        _run_impl(bench, case, "reference", flops, lambda: _embedkit_impl(c, "reference"))
        _run_impl(bench, case, "sdpa-padded-math", flops, lambda: _sdpa_impl(c, "math"))
        for name in PASSES:
            bench.add_speedups(OP, {**case, "pass": name}, baselines=["sdpa-padded-math"], of=["reference"])
        bench.note("attention: CPU run covers the reference and padded SDPA only; the Triton kernel is not "
                   "timed under the interpreter")
        return
    for n in literature_notes():  # context next to the measured rows, never a row
        bench.note(n)
    dtype = torch.bfloat16
    head_dims = head_dims or ([128] if bench.quick else [64, 128])
    kv_heads = [16, 4]
    mixes = mixes or ["a", "b", "c"]
    try:
        import flash_attn  # noqa: F401
        has_flash_attn = True
    except ImportError:
        has_flash_attn = False
        bench.note("flash-attn is not installed: its flash_attn_varlen_func is not measured")
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        has_varlen = True
    except ImportError:
        has_varlen = False
        bench.note("this torch has no torch.nn.attention.varlen.varlen_attn: not measured")
    for mix in mixes:
        lens = _mix(mix, gen, bench.quick)
        for D in head_dims:
            for Hkv in kv_heads:
                Hq = 16
                if bench.out_of_time(f"attention mix={mix} D={D} Hkv={Hkv}"):
                    return
                c = _Case(lens, Hq, Hkv, D, dtype, dev)
                case = {"mix": mix, "B": len(lens), "T": c.T, "max_len": c.max_len, "D": D, "Hq": Hq,
                        "Hkv": Hkv, "dtype": "bfloat16"}
                flops = _flops(lens, Hq, D, False)
                t0 = time.perf_counter()
                mine = _run_impl(bench, case, "embedkit-triton", flops, lambda: _embedkit_impl(c, "triton"))
                bench.note(f"embedkit-triton {case}: first call incl. autotune took "
                           f"{time.perf_counter() - t0:.1f} s in all")
                ours = ["embedkit-triton"]
                if variant_cases is None or (mix, D) in variant_cases:
                    for name in VARIANTS:
                        if _run_impl(bench, case, name, flops, lambda name=name: _variant_impl(c, "triton", name)):
                            ours.append(name)
                    for name in PASSES:
                        bench.add_speedups(OP, {**case, "pass": name}, baselines=["embedkit-triton"], of=ours[1:])
                results = {}
                if has_varlen:
                    results["torch-varlen_attn"] = _run_impl(bench, case, "torch-varlen_attn", flops,
                                                             lambda: _varlen_attn_impl(c, bench))
                if has_flash_attn:
                    results["flash-attn"] = _run_impl(bench, case, "flash-attn", flops, lambda: _flash_attn_impl(c))
                padded_bytes = len(lens) * c.max_len * (Hq + 2 * Hkv) * D * 2
                if padded_bytes < (8 << 30):
                    for name in ("flash", "cudnn", "efficient"):
                        results[f"sdpa-padded-{name}"] = _run_impl(bench, case, f"sdpa-padded-{name}", flops,
                                                                  lambda name=name: _sdpa_impl(c, name))
                    try:
                        _pad_copies(bench, c, case)
                    except Exception as exc:
                        bench.note(f"pad+unpad copies failed for {case}: {exc!r}")
                else:
                    bench.note(f"padded SDPA skipped for {case}: the padded batch would take "
                               f"{padded_bytes / 2**30:.1f} GiB")
                results["flex-attention"] = _run_impl(bench, case, "flex-attention", flops,
                                                      lambda: _flex_impl(c, bench, case))
                if mine is not None:
                    for name in PASSES:
                        bench.add_speedups(OP, {**case, "pass": name}, baselines=list(results), of=ours)
                c = None  # free the case's tensors; not del: the closures above read it
                torch.cuda.empty_cache()


# ---- static model (no GPU): programs, tile work and rotary bytes, old design vs new --------------
# Estimates, not measurements: H100 SXM datasheet rates, tiles as the autotuner's likely pick.

H100_BF16_FLOPS = 989e12
H100_HBM_BYTES = 3.35e12


def _tiles_model(lens, Hq, Hkv, D, bm, bn, exact_grid: bool) -> dict:
    """Programs launched / holding work and the MMA work issued by a forward of query tiles bm and
    key blocks bn (bidirectional), against the useful 4 * len^2 * D per head."""
    import math

    n_work = sum(math.ceil(n / bm) for n in lens) * Hq
    launched = n_work if exact_grid else len(lens) * math.ceil(max(lens) / bm) * Hq
    issued = sum(math.ceil(n / bm) * bm * math.ceil(n / bn) * bn * 4.0 * D for n in lens) * Hq
    useful = sum(4.0 * n * n * D for n in lens) * Hq
    return {"launched": launched, "idle_frac": 1 - n_work / launched, "mma_eff": useful / issued,
            "useful_flops": useful, "issued_flops": issued}


def _rotary_bytes_model(lens, Hq, Hkv, D, R, bm, table_elem: int, design: str) -> dict:
    """Bytes the rotary adds to a forward. DRAM: the tables once per token (L2 keeps them for the
    other heads / tiles). L2 -> SM: per q and k tile load, relative to the attention's own L2 traffic
    (K and V re-read per query tile and head, q read and o written once). old: fp32 cos / sin over the
    full head dim (the gather) and a second load of the partner columns; new: half-width tables in
    their own dtype, no partner load."""
    import math

    T = sum(lens)
    dram = T * D * 2 * (2 * Hq + 2 * Hkv)
    k_rows = sum(math.ceil(n / bm) * n for n in lens) * Hq   # key rows loaded (per query tile, per head)
    q_rows = T * Hq
    l2 = (2 * k_rows + 2 * q_rows) * D * 2
    if design == "old":
        per_row, tables = 2 * D * 4 + R * 2, T * R * 4
    else:
        per_row, tables = 2 * (R // 2) * table_elem, T * R * table_elem
    return {"dram_rel": tables / dram, "l2_rel": (k_rows + q_rows) * per_row / l2}


def static_model(out_dir=None) -> str:
    """Markdown table of the model for the benchmark mixes (a, b) at D 64 / 128, Hkv 16 / 4."""
    gen = torch.Generator().manual_seed(0)
    lines = ["# Attention static model (estimates, no GPU; H100 SXM datasheet 989 TFLOP/s bf16, 3.35 TB/s)", "",
             "Forward, bidirectional, Hq = 16. Old: B x cdiv(max_seqlen, BLOCK_M) grid. New: exact (sequence, "
             "tile) grid. Tiles: the largest the prune keeps for the mix (a: 64 x 64, b: 128 x 64). "
             "est. frac of floor = floor time / max(DRAM bytes time, issued MMA time at peak), idle programs "
             "charged 1 us per wave of 132 x 2 CTAs -- a crude bound, to be replaced by bench_attention on a GPU.",
             "Rotary (R = D): bytes added to DRAM and to the L2 -> SM traffic of the pass, old design / new with fp32 "
             "tables / new with bf16 tables.",
             "", "| mix | D | Hkv | grid | programs | idle | MMA eff | est. frac of floor "
             "| rotary +DRAM old / new32 / new16 "
             "| rotary +L2 old / new32 / new16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    mixes = {"a": _mix("a", gen, False), "b": _mix("b", gen, False)}
    for mix, lens in mixes.items():
        bm, bn = (64, 64) if mix == "a" else (128, 64)
        T = sum(lens)
        for D in (64, 128):
            for Hkv in (16, 4):
                floor_b = T * D * 2 * (2 * 16 + 2 * Hkv)
                for exact in (False, True):
                    m = _tiles_model(lens, 16, Hkv, D, bm, bn, exact)
                    floor_t = max(floor_b / H100_HBM_BYTES, m["useful_flops"] / H100_BF16_FLOPS)
                    waves = m["launched"] * (m["idle_frac"]) / (132 * 2)
                    t = max(floor_b / H100_HBM_BYTES, m["issued_flops"] / H100_BF16_FLOPS) + waves * 1e-6
                    rot = [_rotary_bytes_model(lens, 16, Hkv, D, D, bm, e, d)
                           for d, e in (("old", 4), ("new", 4), ("new", 2))]
                    dram = " / ".join(f"{r['dram_rel']:.1%}" for r in rot)
                    l2 = " / ".join(f"{r['l2_rel']:.0%}" for r in rot)
                    lines.append(f"| {mix} | {D} | {Hkv} | {'exact' if exact else 'B x cdiv'} | {m['launched']} | "
                                 f"{m['idle_frac']:.0%} | {m['mma_eff']:.2f} | {floor_t / t:.2f} | {dram} | {l2} |")
    lines += ["", "FA3-class anchors (literature, not measured; other shapes, H100 SXM):", ""]
    lines += [f"- {n}" for n in literature_notes()]
    text = "\n".join(lines) + "\n"
    if out_dir is not None:
        from pathlib import Path
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "attention_model.md").write_text(text)
    return text


if __name__ == "__main__":
    import sys
    print(static_model(sys.argv[1] if len(sys.argv) > 1 else None))
