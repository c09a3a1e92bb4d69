"""Differentiable all-gather of rows across a torch.distributed group (nce_loss's candidates).

Ranks may hold different numbers of rows (the last batch of an epoch): the collective pads to the
largest and trims after; the backward returns every rank's gradient of a rank's rows to that rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _rank_offsets(sizes):
    return [sum(sizes[:r]) for r in range(len(sizes))]


def _gather_rows(x: torch.Tensor, group, sizes) -> torch.Tensor:
    """Every rank's x concatenated along dim 0; rank r holds sizes[r] rows. Unequal sizes are padded to
    the largest for the collective (all_gather needs equal shapes) and trimmed after."""
    n = max(sizes)
    x = x.contiguous()
    if x.shape[0] < n:
        x = torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    if all(s == n for s in sizes):
        return torch.cat(parts, dim=0)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 (rank r contributes sizes[r] rows) whose backward sums every rank's
    gradient of this rank's rows (so gradients return to the rank that owns the rows)."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, tuple(sizes)
        return _gather_rows(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        group, sizes = ctx.group, ctx.sizes
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        n = max(sizes)
        if all(s == n for s in sizes):
            padded = grad
        else:  # rank r's rows at [r * n, r * n + sizes[r]): the layout reduce_scatter / slicing expects
            padded = grad.new_zeros(world, n, *grad.shape[1:])
            for r, (o, s) in enumerate(zip(_rank_offsets(sizes), sizes)):
                padded[r, :s] = grad[o:o + s]
            padded = padded.reshape(world * n, *grad.shape[1:])
        if dist.get_backend(group) == "nccl":
            out = torch.empty(n, *grad.shape[1:], dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, padded, group=group)
            return out[:sizes[rank]], None, None
        dist.all_reduce(padded, group=group)  # gloo has no reduce_scatter
        return padded[rank * n:rank * n + sizes[rank]].clone(), None, None


def all_gather_with_grad(x: torch.Tensor, group, sizes=None) -> torch.Tensor:
    """Concatenation of every rank's x along dim 0, differentiable. sizes[r]: rank r's number of rows
    (None: every rank has x.shape[0])."""
    if sizes is None:
        sizes = [x.shape[0]] * dist.get_world_size(group)
    if x.requires_grad:
        return _AllGather.apply(x, group, sizes)
    return _gather_rows(x, group, sizes)
