"""pack / unpack: padded [B, L, ...] <-> packed [T, ...] token tensors.

`pack` gathers the tokens of a padded batch (those where attention_mask [B, L] is nonzero, in
order; without a mask, the first len_b positions of each row) into the packed varlen layout;
`unpack` scatters them back and fills the padding. They are each other's adjoint, so both are
differentiable (the gradient of one is the other applied to the gradient). The native backend
runs the csrc kernels (one pass, no nonzero(), no index tensor); the reference is torch's
nonzero + index_select / index_copy.
"""
from __future__ import annotations

import torch

from . import _checks, _dispatch, _native, reference

PACK, UNPACK = "pack", "unpack"
_dispatch.register_op(PACK, {_native.NAME})
_dispatch.register_op(UNPACK, {_native.NAME})


def _native_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.contiguous().view(torch.uint8)


# Layout is made inside the ops, once, on the real tensors (the native wrappers refuse strided ones):
# copies made before a custom op change what torch.compile's graph computes.
@torch.library.custom_op("embedkit::pack", mutates_args=())
def _pack(padded: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor | None,
          total_tokens: int) -> torch.Tensor:
    return _native.pack(padded.contiguous(), cu_seqlens.contiguous(), _native_mask(mask), total_tokens)


@_pack.register_fake
def _pack_fake(padded, cu_seqlens, mask, total_tokens):
    return padded.new_empty((total_tokens, *padded.shape[2:]))


@torch.library.custom_op("embedkit::unpack", mutates_args=())
def _unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor | None, padded_len: int,
            padding_value: float) -> torch.Tensor:
    fill = torch.full(packed.shape[1:], padding_value, dtype=packed.dtype, device=packed.device)
    return _native.unpack(packed.contiguous(), cu_seqlens.contiguous(), _native_mask(mask), padded_len, fill)


@_unpack.register_fake
def _unpack_fake(packed, cu_seqlens, mask, padded_len, padding_value):
    return packed.new_empty((cu_seqlens.shape[0] - 1, padded_len, *packed.shape[1:]))


def _pack_setup(ctx, inputs, output):
    _, cu_seqlens, mask, _ = inputs
    ctx.save_for_backward(cu_seqlens, mask)
    ctx.padded_len = inputs[0].shape[1]


def _pack_backward(ctx, grad):
    cu_seqlens, mask = ctx.saved_tensors
    return _unpack(grad, cu_seqlens, mask, ctx.padded_len, 0.0), None, None, None


def _unpack_setup(ctx, inputs, output):
    packed, cu_seqlens, mask, _, _ = inputs
    ctx.save_for_backward(cu_seqlens, mask)
    ctx.total_tokens = packed.shape[0]


def _unpack_backward(ctx, grad):
    cu_seqlens, mask = ctx.saved_tensors
    return _pack(grad, cu_seqlens, mask, ctx.total_tokens), None, None, None, None


torch.library.register_autograd("embedkit::pack", _pack_backward, setup_context=_pack_setup)
torch.library.register_autograd("embedkit::unpack", _unpack_backward, setup_context=_unpack_setup)


def _check_mask(attention_mask, batch: int, device: torch.device) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    m = _checks.check_tensor(attention_mask, "attention_mask", ndim=2, device=device)
    if m.is_floating_point() or m.is_complex():
        raise TypeError(f"attention_mask must be bool or integer (nonzero = token), got {m.dtype}")
    if m.shape[0] != batch:
        raise ValueError(f"attention_mask must have B = {batch} rows (one per sequence), got {tuple(m.shape)}")
    return m if m.dtype == torch.bool else m != 0


def _check_layout(cu: torch.Tensor, mask: torch.Tensor | None, padded_len: int) -> None:
    """cu_seqlens must describe the padded layout: a length per mask row, or lengths <= L."""
    if not _checks.sync_checks_enabled() or cu.numel() < 2:
        return
    lengths = cu[1:] - cu[:-1]
    if mask is not None:
        bad = mask.sum(dim=1) != lengths
        if bool(bad.any()):
            b = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"attention_mask row {b} has {int(mask[b].sum())} tokens but cu_seqlens gives "
                             f"sequence {b} {int(lengths[b])}")
    elif bool((lengths > padded_len).any()):
        b = int(torch.nonzero(lengths > padded_len)[0, 0])
        raise ValueError(f"sequence {b} has {int(lengths[b])} tokens, more than the padded length {padded_len}")


def pack(padded: torch.Tensor, cu_seqlens: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
         total_tokens: int | None = None) -> torch.Tensor:
    """Packed [T, ...] tokens of padded [B, L, ...] (any dtype).

    attention_mask [B, L] (bool or integer, nonzero = token) picks the tokens, in order; without
    it the batch is right-padded (the first len_b positions of row b). cu_seqlens int32 [B+1] must
    agree with it. total_tokens (= cu_seqlens[-1]) saves a device sync when known.
    """
    _checks.check_tensor(padded, "padded")
    if padded.dim() < 2:
        raise ValueError(f"padded must be [B, L, ...], got shape {tuple(padded.shape)}")
    dev = padded.device
    batch, length = padded.shape[:2]
    cu = _checks.check_cu_seqlens(cu_seqlens, None, dev)
    if cu.numel() != batch + 1:
        raise ValueError(f"cu_seqlens must have B+1 = {batch + 1} entries (padded has B = {batch}), got {cu.numel()}")
    mask = _check_mask(attention_mask, batch, dev)
    if mask is not None and mask.shape[1] != length:
        raise ValueError(f"attention_mask must have shape [B, L] = [{batch}, {length}] like padded, "
                         f"got {tuple(mask.shape)}")
    total = int(cu[-1]) if total_tokens is None else _checks.check_int(total_tokens, "total_tokens", low=0)
    if total_tokens is not None and _checks.sync_checks_enabled() and int(cu[-1]) != total:
        raise ValueError(f"total_tokens = {total} but cu_seqlens[-1] = {int(cu[-1])}")
    _check_layout(cu, mask, length)
    if _dispatch.resolve(PACK, dev) == "reference":
        return reference.pack(padded, cu, mask)
    return _pack(padded, cu, mask, total)


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, padded_len: int | None = None, *,
           attention_mask: torch.Tensor | None = None, padding_value: float = 0.0) -> torch.Tensor:
    """Padded [B, L, ...] of packed [T, ...] (any dtype): the inverse of `pack`.

    L = padded_len, or attention_mask's width, or (neither given) the longest sequence. Positions
    without a token hold padding_value.
    """
    _checks.check_tensor(packed, "packed")
    if packed.dim() < 1:
        raise ValueError("packed must be [T, ...], got a 0-d tensor")
    dev = packed.device
    cu = _checks.check_cu_seqlens(cu_seqlens, packed.shape[0], dev)
    batch = cu.numel() - 1
    mask = _check_mask(attention_mask, batch, dev)
    if padded_len is None:
        padded_len = mask.shape[1] if mask is not None else (int((cu[1:] - cu[:-1]).max()) if batch else 0)
    padded_len = _checks.check_int(padded_len, "padded_len", low=0)
    if mask is not None and mask.shape[1] != padded_len:
        raise ValueError(f"attention_mask has width {mask.shape[1]} but padded_len = {padded_len}")
    if isinstance(padding_value, bool) or not isinstance(padding_value, (int, float)):
        raise TypeError(f"padding_value must be a Python number, got {type(padding_value).__name__}")
    _check_layout(cu, mask, padded_len)
    if _dispatch.resolve(UNPACK, dev) == "reference":
        return reference.unpack(packed, cu, padded_len, mask, padding_value)
    return _unpack(packed, cu, mask, padded_len, float(padding_value))
