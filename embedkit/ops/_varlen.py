"""Per-token facts of the packed (varlen) layout: which sequence a token belongs to, and its position
within that sequence. One definition for every production caller (validation, masked_mean's backward,
PackedBatch, the model's learned positions); the oracles in reference.py keep their own.

Both are safe for any cu_seqlens contents (no index outside [0, T)) and need no host sync, so they
run with validation off and under torch.compile.
"""
from __future__ import annotations

import torch


def _bounds(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """int64 [B+1] boundaries clamped into [0, T], first 0, last T, non-decreasing: cu_seqlens itself
    when it is valid; with validation off, a bad one gives wrong numbers but no out-of-range index."""
    x = cu_seqlens.long().clamp(0, total_tokens)
    x[0] = 0
    x[-1] = total_tokens
    return torch.cummax(x, 0).values


def segment_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """int64 [T]: the index of the sequence each packed token belongs to."""
    lengths = _bounds(cu_seqlens, total_tokens).diff()
    batch = torch.arange(lengths.numel(), device=cu_seqlens.device)
    # The lengths sum to T exactly (see _bounds): output_size never under- or over-runs.
    return torch.repeat_interleave(batch, lengths, output_size=total_tokens)


def positions_in_sequence(cu_seqlens: torch.Tensor, total_tokens: int,
                          seg: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [T]: each packed token's 0-based index within its sequence. `seg`: segment_ids of the
    same arguments, when the caller has them already."""
    if seg is None:
        seg = segment_ids(cu_seqlens, total_tokens)
    starts = _bounds(cu_seqlens, total_tokens)[:-1]
    return torch.arange(total_tokens, device=cu_seqlens.device) - starts[seg]
