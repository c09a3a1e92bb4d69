"""pool_project: fused masked mean-pool + MRL projection against the unfused torch composition
(masked mean, linear, normalize) and sentence-transformers' Pooling (+ Dense + Normalize).

Reported: forward and forward+backward time, and the GB/s of the hidden-state read (T * H * bytes
per element / time) with its fraction of the copy bandwidth measured in the same run, and on the
embedkit kernel's row (the first implementation: triton on a GPU, native or reference on CPU)
speedup_vs_<impl> over each other implementation, same case and pass (bench/harness.py's definition).

Floors (`_floors`): the forward must read the hidden states once and the first out_dim rows of the
weight; forward+backward also writes d_hidden (T x H: the hidden states move twice) and reads the
weight again and writes its gradient. FLOPs (2 B H out_dim per matmul, plus the T H sums) are far
below the bytes at these shapes, so the floor is the byte floor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import embedkit
from embedkit.ops import reference

from .harness import BenchRun

OP = "pool_project"


def _lengths(total: int, mean: int, gen: torch.Generator) -> list[int]:
    out, used = [], 0
    while used < total:
        n = int(torch.randint(max(1, mean // 4), 2 * mean - mean // 4, (1,), generator=gen))
        n = min(n, total - used)
        out.append(n)
        used += n
    return out


def _unfused(hidden, cu, weight, bias, out_dim):
    """The plain torch composition a user would write: masked mean, linear, normalize."""
    pooled = reference.masked_mean(hidden, cu)
    return F.normalize(F.linear(pooled, weight[:out_dim], bias[:out_dim]), dim=-1)


def _sentence_transformers(hidden, cu, weight, bias, out_dim, modules):
    """sentence-transformers' Pooling -> Dense -> Normalize on the padded batch."""
    pooling, dense, norm = modules
    batch = embedkit.PackedBatch(cu)
    feats = {"token_embeddings": batch.pad(hidden), "attention_mask": batch.attention_mask().long()}
    return norm(dense(pooling(feats)))["sentence_embedding"]


def _st_modules(H, weight, bias, out_dim):
    try:
        from sentence_transformers.models import Dense, Normalize, Pooling
    except ImportError:
        return None
    dense = Dense(H, out_dim, bias=True, activation_function=torch.nn.Identity())
    with torch.no_grad():
        dense.linear.weight = torch.nn.Parameter(weight[:out_dim].detach().clone())
        dense.linear.bias = torch.nn.Parameter(bias[:out_dim].detach().clone())
    return Pooling(H, pooling_mode="mean").to(weight.device), dense.to(weight.device, weight.dtype), Normalize()


def _floors(T: int, H: int, B: int, out_dim: int, elem: int, backward: bool) -> dict:
    """The case's minimum bytes and FLOPs (see the module docstring)."""
    if not backward:
        return {"floor_bytes": (T * H + out_dim * H + B * out_dim) * elem,
                "floor_flops": 2.0 * B * H * out_dim + T * H}
    return {"floor_bytes": (2 * T * H + 3 * out_dim * H + 2 * B * out_dim) * elem,
            "floor_flops": 6.0 * B * H * out_dim + 2 * T * H}


def run(bench: BenchRun, *, sizes: list[tuple[int, int]] | None = None) -> None:
    """sizes = [(T, H), ...] narrows the GPU cases (bench/gpu_check.py runs the headline one)."""
    dev = bench.device
    gpu_sizes = sizes
    if bench.on_gpu:
        dtype = torch.bfloat16
        sizes = [(16384, 1024), (262144, 4096)] if bench.quick else \
            [(16384, 1024), (16384, 4096), (262144, 1024), (262144, 4096)]
        out_dims = [768, 3072]
        impls = ["triton", "torch-unfused", "sentence-transformers"]
    else:
        dtype = torch.float32
        sizes = [(2048, 256)] if bench.quick else [(4096, 256), (16384, 512)]
        out_dims = [768]
        impls = ["reference", "torch-unfused", "sentence-transformers"]
        if "native" in embedkit.available_backends(OP):
            impls.insert(0, "native")
    gen = torch.Generator().manual_seed(0)
    d_out = 3072
    if bench.on_gpu and gpu_sizes:
        sizes = gpu_sizes
    for T, H in sizes:
        if bench.out_of_time(f"pool_project T={T} H={H}"):
            return
        cu_list = [0]
        for n in _lengths(T, 128, gen):
            cu_list.append(cu_list[-1] + n)
        cu = torch.tensor(cu_list, dtype=torch.int32, device=dev)
        hidden = torch.randn(T, H, device=dev, dtype=dtype, requires_grad=True)
        weight = (torch.randn(d_out, H, device=dev, dtype=dtype) * H ** -0.5).requires_grad_()
        bias = torch.zeros(d_out, device=dev, dtype=dtype, requires_grad=True)
        read = T * H * hidden.element_size()
        for out_dim in out_dims:
            case = {"T": T, "H": H, "out_dim": out_dim, "B": len(cu_list) - 1, "dtype": str(dtype)[6:]}
            st = _st_modules(H, weight, bias, out_dim) if "sentence-transformers" in impls else None
            if "sentence-transformers" in impls and st is None:
                bench.note("sentence-transformers is not installed: its Pooling is not measured")
            for impl in impls:
                if impl in ("triton", "native", "reference"):
                    def fwd(impl=impl):
                        with embedkit.use_backend(impl):
                            return embedkit.pool_project(hidden, cu, weight, bias, out_dim=out_dim, normalize=True)
                elif impl == "torch-unfused":
                    def fwd():
                        return _unfused(hidden, cu, weight, bias, out_dim)
                else:
                    if st is None:
                        continue

                    def fwd():
                        return _sentence_transformers(hidden, cu, weight, bias, out_dim, st)
                with torch.no_grad():
                    ms_f = bench.time_ms(fwd)
                g = torch.randn(case["B"], out_dim, device=dev, dtype=dtype)

                def fwd_bwd(fwd=fwd):
                    out = fwd()
                    torch.autograd.backward(out, g)
                    hidden.grad = weight.grad = bias.grad = None

                ms_fb = bench.time_ms(fwd_bwd)
                elem, B = hidden.element_size(), case["B"]
                bench.record(OP, {**case, "pass": "fwd"}, impl, ms=ms_f, bytes_moved=read,
                             **_floors(T, H, B, out_dim, elem, False))
                bench.record(OP, {**case, "pass": "fwd+bwd"}, impl, ms=ms_fb, bytes_moved=read,
                             **_floors(T, H, B, out_dim, elem, True))
            # The embedkit kernel (the first implementation) against every other one, same run.
            for name in ("fwd", "fwd+bwd"):
                bench.add_speedups(OP, {**case, "pass": name}, baselines=impls[1:], of=impls[:1])
