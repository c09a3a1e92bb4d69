"""PackedBatch: the varlen description of a batch of sequences concatenated into [T, ...].

Holds cu_seqlens (int32 [B+1]), max_seqlen, and optional per-token position ids ([T] or [3, T]),
modality ids ([T]) and pool mask ([T] bool). `unpad` / `pad` move token tensors between the
padded [B, L, ...] layout and the packed one through embedkit.ops.pack / unpack, which dispatch on
the backend in force like every op (native kernels, or the reference's index_select / index_copy;
a backend without pack / unpack, e.g. "triton", raises BackendUnavailableError instead of falling
back). The layout `unpad` came from (left- or right-padded) is kept, so `pad` restores exactly it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence, cast

import torch

from .ops import _checks, _varlen
from .ops import packing as _pack_ops


def _mark_static(t: torch.Tensor, dim: int) -> None:
    """torch._dynamo.mark_static(t, dim) without importing dynamo (1 s at import) when nothing is
    compiling yet. The 3 of multimodal position_ids [3, T] is a constant of the layout: left dynamic,
    torch.compile's duck sizing gives it the same symbol as any other size 3 (cu_seqlens of a batch
    of 2), and the rotary check `shape[0] == 3` then specializes that one too -> a recompile for every
    batch size."""
    import sys

    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].mark_static(t, dim)
        return
    # What mark_static records (read by dynamo when it wraps the tensor).
    static = getattr(t, "_dynamo_static_indices", None)
    if static is None:
        static = set()
        setattr(t, "_dynamo_static_indices", static)
    static.add(dim)
    setattr(t, "_has_dynamo_dim_marking", True)


@dataclass
class PackedBatch:
    cu_seqlens: torch.Tensor
    max_seqlen: int | None = None
    position_ids: torch.Tensor | None = None
    modality_ids: torch.Tensor | None = None
    pool_mask: torch.Tensor | None = None
    # Flat indices into [B * padded_len] of each packed token, when built from a padded batch.
    token_indices: torch.Tensor | None = field(default=None, repr=False)
    padded_len: int | None = None
    # The bool [B, padded_len] mask the batch was built from (from_attention_mask): pack / unpack
    # read it instead of token_indices.
    source_mask: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        cu = self.cu_seqlens
        if isinstance(cu, torch.Tensor):
            if cu.is_inference():
                # An inference tensor has no version counter, so its validation could not be
                # remembered: keep a normal copy ([B+1] ints), checked once for every layer.
                with torch.inference_mode(False):
                    cu = cu.clone()
            # Kept for every layer's kernels, which index it with stride 1: one copy here, if strided.
            cu = cu.contiguous()
        cu = _checks.check_cu_seqlens(cu, None, None)
        self.cu_seqlens = cu
        device = cu.device
        # T and the longest length: read from the device once, here (the same read that validates
        # cu_seqlens, in int64), and never per access; later op checks of this tensor are free.
        total, longest = _checks.seqlens_summary(cu)
        if self.max_seqlen is None:
            self.max_seqlen = int(longest)
        else:
            self.max_seqlen = _checks.check_max_seqlen(self.max_seqlen, cu)
        self._total_tokens = int(total)
        if self.position_ids is not None:
            pos = _checks.check_tensor(self.position_ids, "position_ids",
                                       dtypes=(torch.int32, torch.int64), device=device)
            if not (pos.shape == (total,) or pos.shape == (3, total)):
                raise ValueError(f"position_ids must have shape [T] or [3, T] with T = {total}, "
                                 f"got {tuple(pos.shape)}")
            if pos.dim() == 2:
                _mark_static(pos, 0)
        if self.modality_ids is not None:
            mod = _checks.check_tensor(self.modality_ids, "modality_ids", ndim=1,
                                       dtypes=(torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64),
                                       device=device)
            if mod.shape[0] != total:
                raise ValueError(f"modality_ids must have T = {total} entries, got {mod.shape[0]}")
        if self.pool_mask is not None:
            pm = _checks.check_tensor(self.pool_mask, "pool_mask", ndim=1, dtypes=(torch.bool,), device=device)
            if pm.shape[0] != total:
                raise ValueError(f"pool_mask must have T = {total} entries, got {pm.shape[0]}")
        if self.token_indices is not None:
            idx = _checks.check_tensor(self.token_indices, "token_indices", ndim=1,
                                       dtypes=(torch.int64,), device=device)
            if idx.shape[0] != total:
                raise ValueError(f"token_indices must have T = {total} entries, got {idx.shape[0]}")
            if self.padded_len is None:
                raise ValueError("padded_len is required together with token_indices")
        if self.source_mask is not None:
            sm = _checks.check_tensor(self.source_mask, "source_mask", ndim=2, dtypes=(torch.bool,), device=device)
            if self.token_indices is None or tuple(sm.shape) != (self.batch_size, self.padded_len):
                raise ValueError("source_mask must come with token_indices and have shape [B, padded_len]")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_lengths(cls, lengths: Sequence[int] | torch.Tensor, *, device: torch.device | str | None = None,
                     **fields: Any) -> "PackedBatch":
        """Sequences of the given lengths, packed back to back (at most 2^31 - 1 tokens in all:
        cu_seqlens is int32)."""
        try:
            lens = torch.as_tensor(lengths, device=device)
        except (OverflowError, RuntimeError) as err:  # e.g. a Python int beyond int64
            raise ValueError(f"lengths must be a 1-D sequence of ints that fit in int64: {err}") from None
        if lens.dim() != 1 or lens.numel() == 0:
            raise ValueError(f"lengths must be a non-empty 1-D sequence of ints, got shape {tuple(lens.shape)}")
        if lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool:
            raise TypeError(f"lengths must be integers, got dtype {lens.dtype}")
        lens = lens.long()
        # Summed in int64 (int32 wraps: [2^31 - 1, 10] gave a negative total, [2^32] gave 0), one
        # host read. An int64 partial sum that wraps turns negative, so cum.min() catches that too.
        cum = torch.cumsum(lens, 0)
        low, longest, total, cum_low = torch.stack([lens.min(), lens.max(), cum[-1], cum.min()]).tolist()
        if low < 0:
            raise ValueError("lengths must be >= 0")
        if total > _checks.INT32_MAX or total < 0 or cum_low < 0:
            raise ValueError(f"lengths sum to {total} tokens, more than int32 cu_seqlens can index "
                             f"(at most 2^31 - 1 = {_checks.INT32_MAX} tokens per batch)")
        cu = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=lens.device)
        cu[1:] = cum
        return cls(cu, int(longest), **fields)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor, **fields: Any) -> "PackedBatch":
        """The packing of a padded batch whose attention_mask [B, L] marks real tokens with 1/True."""
        mask = _checks.check_tensor(attention_mask, "attention_mask", ndim=2)
        if mask.is_floating_point():
            raise TypeError(f"attention_mask must be bool or integer (1 = token, 0 = padding), got {mask.dtype}")
        mask = mask.bool()
        if mask.numel() > _checks.INT32_MAX:  # only then can the token count pass int32
            total = int(mask.sum(dtype=torch.int64))
            if total > _checks.INT32_MAX:
                raise ValueError(f"attention_mask holds {total} tokens, more than int32 cu_seqlens can "
                                 f"index (at most 2^31 - 1 = {_checks.INT32_MAX})")
        lengths = mask.sum(dim=1, dtype=torch.int32)
        cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = torch.cumsum(lengths, 0)
        indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
        max_len = int(lengths.max()) if mask.shape[0] else 0
        return cls(cu, max_len, token_indices=indices, padded_len=mask.shape[1], source_mask=mask, **fields)

    @classmethod
    def from_padded(cls, padded: torch.Tensor, attention_mask: torch.Tensor,
                    **fields: Any) -> tuple[torch.Tensor, "PackedBatch"]:
        """(packed [T, ...], PackedBatch) from padded [B, L, ...] and attention_mask [B, L]."""
        batch = cls.from_attention_mask(attention_mask, **fields)
        return batch.unpad(padded), batch

    # ---- layout conversion --------------------------------------------------------------------
    def _indices(self) -> torch.Tensor:
        if self.token_indices is not None:
            return self.token_indices
        # Right-padded layout: token j of sequence b sits at b * max_seqlen + j.
        seg = self.seq_ids()
        offs = _varlen.positions_in_sequence(self.cu_seqlens, self.total_tokens, seg)
        return seg * cast(int, self.max_seqlen) + offs  # (set by __post_init__; cast: no int() under compile)

    def _padded_len(self) -> int:
        return self.padded_len if self.padded_len is not None else cast(int, self.max_seqlen)

    def _layout_mask(self) -> torch.Tensor | None:
        """The padded layout for ops.pack / unpack: None = right-padded (no token_indices), else a
        bool [B, padded_len] mask. Hand-made token_indices must be increasing (as from_attention_mask
        makes them): a mask describes only that order."""
        if self.source_mask is not None:
            return self.source_mask
        if self.token_indices is None:
            return None
        if _checks.sync_checks_enabled() and self.total_tokens > 1:
            if bool((self.token_indices[1:] <= self.token_indices[:-1]).any()):
                raise ValueError("token_indices must be increasing (the order of the padded positions)")
        return self.attention_mask()

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Packed [T, ...] tokens of padded [B, L, ...] (embedkit.ops.pack, on the backend in force)."""
        x = _checks.check_tensor(padded, "padded", device=self.device)
        if x.dim() < 2 or x.shape[0] != self.batch_size or x.shape[1] != self._padded_len():
            raise ValueError(f"padded must have shape [B={self.batch_size}, L={self._padded_len()}, ...], "
                             f"got {tuple(x.shape)}")
        return _pack_ops.pack(x, self.cu_seqlens, self._layout_mask(), total_tokens=self.total_tokens)

    def pad(self, packed: torch.Tensor, padding_value: float = 0.0) -> torch.Tensor:
        """Padded [B, L, ...] of packed [T, ...] tokens (padding filled with padding_value;
        embedkit.ops.unpack, on the backend in force)."""
        x = _checks.check_tensor(packed, "packed", device=self.device)
        if x.dim() < 1 or x.shape[0] != self.total_tokens:
            raise ValueError(f"packed must have T = {self.total_tokens} rows, got shape {tuple(x.shape)}")
        return _pack_ops.unpack(x, self.cu_seqlens, self._padded_len(), attention_mask=self._layout_mask(),
                                padding_value=padding_value)

    def attention_mask(self) -> torch.Tensor:
        """bool [B, L]: True where a padded position holds a token."""
        flat = torch.zeros(self.batch_size * self._padded_len(), dtype=torch.bool, device=self.device)
        flat[self._indices()] = True
        return flat.view(self.batch_size, self._padded_len())

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def total_tokens(self) -> int:
        return self._total_tokens

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def seq_ids(self) -> torch.Tensor:
        """int64 [T]: which sequence each token belongs to."""
        return _varlen.segment_ids(self.cu_seqlens, self.total_tokens)

    def positions(self) -> torch.Tensor:
        """position_ids if given, else each token's 0-based index within its sequence ([T], int64)."""
        if self.position_ids is not None:
            return self.position_ids
        return _varlen.positions_in_sequence(self.cu_seqlens, self.total_tokens)

    def to(self, device: torch.device | str) -> "PackedBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, cu_seqlens=self.cu_seqlens.to(device), position_ids=move(self.position_ids),
                       modality_ids=move(self.modality_ids), pool_mask=move(self.pool_mask),
                       token_indices=move(self.token_indices), source_mask=move(self.source_mask))
