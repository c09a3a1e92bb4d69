"""varlen_attention, rotary_tables and the flash-attn drop-in flash_attn_varlen_func.

STUB (foundation): dispatches to the pure-torch reference only, so that model / integration code
can be written against the final signatures. The Triton kernels replace this (issue 3).
"""
from __future__ import annotations

import torch

from . import _checks, _dispatch, reference

OP = "varlen_attention"
_dispatch.register_op(OP, set())


def rotary_tables(position_ids: torch.Tensor, rotary_dim: int, theta: float = 10000.0, sections=None):
    """(cos, sin) fp32 [T, rotary_dim / 2] from position ids [T] or [3, T] (then `sections`)."""
    _checks.check_tensor(position_ids, "position_ids", dtypes=(torch.int32, torch.int64))
    if position_ids.dim() == 2 and position_ids.shape[0] == 3:
        if sections is None or len(sections) != 3 or 2 * sum(sections) != rotary_dim:
            raise ValueError(f"sections must be 3 ints summing to rotary_dim / 2 = {rotary_dim // 2} for "
                             f"position_ids of shape [3, T], got {sections!r}")
    elif position_ids.dim() != 1:
        raise ValueError(f"position_ids must have shape [T] or [3, T], got {tuple(position_ids.shape)}")
    _checks.check_int(rotary_dim, "rotary_dim", low=2)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    return reference.rotary_tables(position_ids, rotary_dim, theta, sections)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=False, softmax_scale=None, rotary=None,
                     return_lse=False):
    backend = _dispatch.resolve(OP, q.device)
    assert backend == "reference"
    return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal,
                                      softmax_scale=softmax_scale, rotary=rotary, return_lse=return_lse)
