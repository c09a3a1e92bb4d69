"""masked_mean: the mean of the pooled tokens of each packed sequence (pool_project's pooling half).

One GPU kernel: Triton (embedkit._triton.pool_project.masked_mean_fwd, the same kernel pool_project
uses); on CPU the native C++ twin in csrc/ (libembedkit_cpu). Both are held against each other and
the reference. Backward is a broadcast: d_hidden[t] = pool_mask[t] * d_out[b(t)] / count[b(t)]
(torch ops).
"""
from __future__ import annotations

import torch

from . import _checks, _dispatch, _native, _triton_backend, _varlen, reference

OP = "masked_mean"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# The kernels' launchers, by backend. Layout is made in them, inside the custom op, once, on the real
# tensors: copies made outside the custom op changed what torch.compile's graph computed.
def _native_fwd(hidden, cu_seqlens, pool_mask):
    total, width = hidden.shape
    if (width > 1 and hidden.stride(1) != 1) or (total > 1 and hidden.stride(0) < width):
        hidden = hidden.contiguous()  # the C++ twin takes strided rows, not strided or overlapping columns
    mask = None if pool_mask is None else pool_mask.contiguous().view(torch.uint8)
    return _native.masked_mean(hidden, cu_seqlens.contiguous(), mask)


def _triton_fwd(hidden, cu_seqlens, pool_mask):
    from embedkit._triton.pool_project import masked_mean_fwd  # (makes its inputs contiguous itself)

    pooled, counts = masked_mean_fwd(hidden, cu_seqlens, pool_mask)
    return pooled.to(hidden.dtype), counts


_KERNELS = {_native.NAME: _native_fwd, _triton_backend.NAME: _triton_fwd}
_dispatch.register_op(OP, set(_KERNELS))


@torch.library.custom_op("embedkit::masked_mean_fwd", mutates_args=())
def _fwd(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pool_mask: torch.Tensor | None,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _KERNELS[backend](hidden, cu_seqlens, pool_mask)


@_fwd.register_fake
def _fwd_fake(hidden, cu_seqlens, pool_mask, backend):
    batch = cu_seqlens.shape[0] - 1
    return (hidden.new_empty(batch, hidden.shape[1]),
            torch.empty(batch, dtype=torch.float32, device=hidden.device))


def _setup_context(ctx, inputs, output):
    hidden, cu_seqlens, pool_mask, _ = inputs
    ctx.save_for_backward(output[1], cu_seqlens, pool_mask)
    ctx.total = hidden.shape[0]
    ctx.dtype = hidden.dtype


def _backward(ctx, grad_out, _grad_counts):
    counts, cu_seqlens, pool_mask = ctx.saved_tensors
    seg = _varlen.segment_ids(cu_seqlens, ctx.total)
    d = (grad_out.float() / counts[:, None]).index_select(0, seg)
    if pool_mask is not None:
        d = d * pool_mask[:, None]
    return d.to(ctx.dtype), None, None, None


torch.library.register_autograd("embedkit::masked_mean_fwd", _backward, setup_context=_setup_context)


def masked_mean(hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                pool_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H] mean of the pooled tokens of each packed sequence of hidden [T, H], in hidden's dtype.

    cu_seqlens int32 [B+1]; pool_mask [T] bool (True = pooled). fp32 accumulation. A sequence with
    no pooled token is an error. Differentiable in hidden.
    """
    hidden = _checks.check_float(hidden, "hidden", ndim=2, allowed=_FLOATS + (torch.float64,))
    dev = hidden.device
    total = hidden.shape[0]
    cu = _checks.check_cu_seqlens(cu_seqlens, total, dev)
    _checks.check_pool_mask(pool_mask, cu, total, dev)
    backend = _dispatch.resolve(OP, dev)
    if backend == "reference":
        return reference.masked_mean(hidden, cu, pool_mask)
    if hidden.dtype == torch.float64:
        raise TypeError(f"hidden: the {backend} backend of {OP} takes float16, bfloat16 or float32, "
                        "got float64 (use backend 'reference' for float64)")
    return _fwd(hidden, cu_seqlens, pool_mask, backend)[0]
