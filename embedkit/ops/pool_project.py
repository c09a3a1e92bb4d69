"""pool_project: masked mean-pool of each packed sequence, then the first out_dim rows of a linear
projection (Matryoshka inference), optionally L2-normalized.

Three layers (as flash-attn does): torch.library custom ops `embedkit::pool_project_fwd` / `_bwd`
with fake implementations (torch.compile traces them without running a kernel) -> autograd
registration -> the public function, which validates inputs and picks the backend.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _checks, _dispatch, reference

OP = "pool_project"
_dispatch.register_op(OP, {"triton"})

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _kernels(backend: str):
    if backend == "triton":
        from embedkit._triton import pool_project as kernels

        return kernels
    raise AssertionError(f"no {backend} kernels for {OP}")


@torch.library.custom_op("embedkit::pool_project_fwd", mutates_args=())
def _fwd(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         pool_mask: torch.Tensor | None, out_dim: int, normalize: bool, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels(backend).pool_project_fwd(hidden, cu_seqlens, weight, bias, pool_mask, out_dim, normalize)


@_fwd.register_fake
def _fwd_fake(hidden, cu_seqlens, weight, bias, pool_mask, out_dim, normalize, backend):
    B = cu_seqlens.shape[0] - 1
    H = hidden.shape[1]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    n = B if normalize else 0
    return (hidden.new_empty(B, out_dim), torch.empty(B, H, **f32), torch.empty(B, **f32),
            torch.empty(n, out_dim if normalize else 0, **f32) if normalize else torch.empty(0, **f32),
            torch.empty(n, **f32))


@torch.library.custom_op("embedkit::pool_project_bwd", mutates_args=())
def _bwd(grad_out: torch.Tensor, pooled: torch.Tensor, counts: torch.Tensor, y: torch.Tensor,
         inv_norm: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
         pool_mask: torch.Tensor | None, total: int, width: int, dtype: torch.dtype, has_bias: bool,
         normalize: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """total, width, dtype: hidden's [T, H] and dtype, the shape of d_hidden (hidden itself is not kept)."""
    d_hidden, d_weight, d_bias = _kernels(backend).pool_project_bwd(
        grad_out, pooled, counts, y, inv_norm, (total, width), dtype, cu_seqlens, weight,
        has_bias, pool_mask, normalize)
    if d_bias is None:
        d_bias = weight.new_empty(0)
    return d_hidden, d_weight, d_bias


@_bwd.register_fake
def _bwd_fake(grad_out, pooled, counts, y, inv_norm, cu_seqlens, weight, pool_mask, total, width, dtype,
              has_bias, normalize, backend):
    return (torch.empty(total, width, dtype=dtype, device=grad_out.device), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if has_bias else 0))


def _setup_context(ctx, inputs, output):
    hidden, cu_seqlens, weight, bias, pool_mask, out_dim, normalize, backend = inputs
    _, pooled, counts, y, inv_norm = output
    # Only what the backward reads: of hidden its shape and dtype (d_hidden's), not the [T, H] tensor.
    ctx.save_for_backward(pooled, counts, y, inv_norm, cu_seqlens, weight, pool_mask)
    ctx.total, ctx.width = hidden.shape
    ctx.dtype = hidden.dtype
    ctx.has_bias = bias is not None
    ctx.normalize = normalize
    ctx.backend = backend


def _backward(ctx, grad_out, _g_pooled, _g_counts, _g_y, _g_inv):
    pooled, counts, y, inv_norm, cu_seqlens, weight, pool_mask = ctx.saved_tensors
    d_hidden, d_weight, d_bias = _bwd(grad_out, pooled, counts, y, inv_norm, cu_seqlens, weight, pool_mask,
                                      ctx.total, ctx.width, ctx.dtype, ctx.has_bias, ctx.normalize, ctx.backend)
    return d_hidden, None, d_weight, d_bias if ctx.has_bias else None, None, None, None, None


torch.library.register_autograd("embedkit::pool_project_fwd", _backward, setup_context=_setup_context)


def _validate(hidden, cu_seqlens, weight, bias, pool_mask, out_dim):
    hidden = _checks.check_float(hidden, "hidden", ndim=2, allowed=_FLOATS + (torch.float64,))
    dev = hidden.device
    T, H = hidden.shape
    if H == 0:
        raise ValueError("hidden must have at least one column (H >= 1), got shape "
                         f"{tuple(hidden.shape)}")
    weight = _checks.check_float(weight, "weight", ndim=2, device=dev, allowed=_FLOATS + (torch.float64,))
    _checks.check_same_dtype(weight, "weight", hidden.dtype, "hidden")
    d_out = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape [D_out, H] with H = {H} (hidden's width), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        bias = _checks.check_float(bias, "bias", ndim=1, device=dev, allowed=_FLOATS + (torch.float64,))
        _checks.check_same_dtype(bias, "bias", hidden.dtype, "hidden")
        if bias.shape[0] != d_out:
            raise ValueError(f"bias must have D_out = {d_out} entries (weight's rows), got {bias.shape[0]}")
    out_dim = d_out if out_dim is None else _checks.check_int(out_dim, "out_dim", low=1, high=d_out)
    cu = _checks.check_cu_seqlens(cu_seqlens, T, dev)
    pool_mask = _checks.check_pool_mask(pool_mask, cu, T, dev)
    return out_dim, cu, pool_mask


def pool_project(hidden: torch.Tensor, cu_seqlens: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, *, pool_mask: torch.Tensor | None = None,
                 out_dim: int | None = None, normalize: bool = False) -> torch.Tensor:
    """Mean of the pooled tokens of each packed sequence, projected to out_dim (MRL prefix).

    hidden [T, H]; cu_seqlens int32 [B+1]; weight [D_out, H] (nn.Linear layout); bias [D_out];
    pool_mask [T] bool (True = pooled); out_dim <= D_out. Returns [B, out_dim] in hidden's dtype,
    L2-normalized when `normalize`. Differentiable in hidden, weight and bias.
    """
    # The caller's tensors go to the custom op as they are: each launcher makes its inputs contiguous
    # once, at run time (copies made out here changed what torch.compile's graph computed).
    out_dim = _validate(hidden, cu_seqlens, weight, bias, pool_mask, out_dim)[0]
    if not isinstance(normalize, (bool, np.bool_)):  # "no" / "false" strings would be truthy
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__} {normalize!r}")
    normalize = bool(normalize)
    backend = _dispatch.resolve(OP, hidden.device)
    if backend == "reference":
        return reference.pool_project(hidden, cu_seqlens, weight, bias, pool_mask=pool_mask,
                                      out_dim=out_dim, normalize=normalize)
    if hidden.dtype == torch.float64:
        raise TypeError(f"hidden: the {backend} backend of {OP} takes float16, bfloat16 or float32, "
                        "got float64 (use backend 'reference' for float64)")
    return _fwd(hidden, cu_seqlens, weight, bias, pool_mask, out_dim, bool(normalize), backend)[0]
