"""The reference backend of varlen_attention as a torch.library custom op.

reference.varlen_attention loops over the sequences in Python (reading cu_seqlens on the host).
Called directly under torch.compile, dynamo traces that loop: a data-dependent guard (fullgraph
fails, or one graph per batch layout and minutes of compile time on the first call). Behind a
custom op with a fake implementation the compiler sees one opaque node whose output shapes follow
from q / v alone, so the model forward compiles once for every batch (dynamic shapes) on every
backend. Eager results are those of reference.varlen_attention, bit for bit (the op runs it).

The backward (`backward` below) recomputes each sequence's scores and applies the chain rule by
hand (no per-sequence score matrices saved between forward and backward: activation memory as the
kernels'); the tests hold it to differentiating reference.varlen_attention with autograd.
"""
from __future__ import annotations

import torch
from einops import rearrange, reduce

from . import reference


def _rotary(cos, sin):
    return None if cos is None else (cos, sin)


@torch.library.custom_op("embedkit::varlen_attention_reference_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
         causal: bool, softmax_scale: float, cos: torch.Tensor | None, sin: torch.Tensor | None,
         need_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if need_lse:
        return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale,
                                          rotary=_rotary(cos, sin), return_lse=True)
    out = reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale,
                                     rotary=_rotary(cos, sin))
    return out, _empty_lse(q, 0)


def _empty_lse(q: torch.Tensor, n) -> torch.Tensor:
    return torch.empty(q.shape[1], n, dtype=reference._acc_dtype(q.dtype), device=q.device)


@_fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, cos, sin, need_lse):
    T, Hq, _ = q.shape
    return q.new_empty(T, Hq, v.shape[-1]), _empty_lse(q, T if need_lse else 0)


@torch.library.custom_op("embedkit::varlen_attention_reference_bwd", mutates_args=())
def _bwd(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
         v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool, softmax_scale: float,
         cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(grad_out, grad_lse, q, k, v, cu_seqlens, causal, softmax_scale, _rotary(cos, sin))


def backward(grad_out, grad_lse, q, k, v, cu_seqlens, causal, scale, rotary):
    """(dq, dk, dv) of reference.varlen_attention, by its chain rule, one sequence at a time, in q's
    dtype (as the forward). Written out rather than taken from autograd: a custom op's body runs
    below the autograd dispatch key, where no graph is recorded. With P = softmax(S), S = scale q k^T:
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P) + dlse), dq = scale dS k, dk = scale dS^T q;
    GQA sums the group's query heads into their kv head; rotary's derivative is the inverse rotation."""
    Hkv = k.shape[1]
    if rotary is not None:
        q = reference.apply_rotary(q, *rotary)
        k = reference.apply_rotary(k, *rotary)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n == 0:
            continue
        # Query head h * group + j uses kv head h: queries as [Hkv, group, n, D] against keys and
        # values broadcast as [Hkv, 1, n, D] (the same layout as reference.varlen_attention).
        qs = rearrange(q[start:end], "n (h g) d -> h g n d", h=Hkv)
        ks = rearrange(k[start:end], "n h d -> h 1 n d")
        vs = rearrange(v[start:end], "n h d -> h 1 n d")
        scores = (qs @ ks.transpose(-1, -2)) * scale                        # [Hkv, g, n, n]
        if causal:
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        do = rearrange(grad_out[start:end], "n (h g) d -> h g n d", h=Hkv)
        dp = do @ vs.transpose(-1, -2)
        ds = dp - (dp * p).sum(-1, keepdim=True)
        if grad_lse is not None:
            ds = ds + rearrange(grad_lse[:, start:end].to(q.dtype), "(h g) n -> h g n 1", h=Hkv)
        ds = p * ds
        # A kv head's gradient sums over the query heads of its group.
        dv[start:end] = reduce(p.transpose(-1, -2) @ do, "h g n d -> n h d", "sum")
        dq[start:end] = rearrange(ds @ ks * scale, "h g n d -> n (h g) d")
        dk[start:end] = reduce(ds.transpose(-1, -2) @ qs * scale, "h g n d -> n h d", "sum")
    if rotary is not None:  # the transpose of a rotation by theta is the rotation by -theta
        cos, sin = rotary
        dq = reference.apply_rotary(dq, cos, -sin)
        dk = reference.apply_rotary(dk, cos, -sin)
    return dq, dk, dv


@_bwd.register_fake
def _bwd_fake(grad_out, grad_lse, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, cos, sin):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, cos, sin, need_lse = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens, cos, sin)
    ctx.max_seqlen, ctx.causal, ctx.softmax_scale, ctx.need_lse = max_seqlen, causal, softmax_scale, need_lse
    # An unused lse gets grad None (not materialized zeros), as differentiating the reference would.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, cu_seqlens, cos, sin = ctx.saved_tensors
    if grad_out is None:
        grad_out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    if not ctx.need_lse:
        grad_lse = None
    dq, dk, dv = _bwd(grad_out, grad_lse, q, k, v, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.softmax_scale,
                      cos, sin)
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("embedkit::varlen_attention_reference_fwd", _backward,
                                setup_context=_setup_context)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, causal: bool, softmax_scale: float, rotary,
                     return_lse: bool):
    """reference.varlen_attention's results through the custom op (inputs already validated)."""
    cos, sin = (None, None) if rotary is None else rotary
    out, lse = _fwd(q, k, v, cu_seqlens, max_seqlen, causal, float(softmax_scale), cos, sin, bool(return_lse))
    return (out, lse) if return_lse else out
