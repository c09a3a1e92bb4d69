"""flash-attn 2's other entry points, built on embedkit.ops.flash_attn_varlen_func.

Same names, same positional order and defaults as flash_attn.flash_attn_interface, so that
`from embedkit.ops.flash_attn_compat import flash_attn_func` can replace
`from flash_attn import flash_attn_func`:

- flash_attn_func(q, k, v, ...): dense [B, S, H, D] batches of one fixed length.
- flash_attn_qkvpacked_func(qkv [B, S, 3, H, D]), flash_attn_kvpacked_func(q, kv [B, S, 2, Hk, D]).
- flash_attn_varlen_qkvpacked_func(qkv [T, 3, H, D], cu_seqlens, max_seqlen, ...).
- flash_attn_varlen_kvpacked_func(q, kv [T, 2, Hk, D], cu_seqlens_q, cu_seqlens_k, ...).

Self-attention only, as flash_attn_varlen_func: queries and keys of different lengths
(cross-attention: S_q != S_k, or cu_seqlens_k != cu_seqlens_q) raise NotImplementedError, and so do
dropout, sliding windows, softcap and ALiBi. GQA / MQA (fewer K/V heads) work. With
return_attn_probs=True the result is (out, softmax_lse, empty tensor) as flash-attn 2 without
dropout gives; softmax_lse is [B, H, S] for the dense functions and [H, T] for the varlen ones.
Packed inputs are split with unbind (views): the gradient flows back into qkv / kv.
"""
from __future__ import annotations

from typing import Union

import torch

from .attention import flash_attn_varlen_func

# out, or (out, softmax_lse, empty probs) with return_attn_probs=True, as flash-attn 2 returns
Result = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _check_dense(name: str, x, rank: int, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {shape_doc} (rank {rank}), got {tuple(x.shape)}")


def _packed(name: str, x, n: int, rank: int, axis: int, shape_doc: str) -> tuple[torch.Tensor, ...]:
    _check_dense(name, x, rank, shape_doc)
    if x.shape[axis] != n:
        raise ValueError(f"{name} must have shape {shape_doc} ({n} at dim {axis}), got {tuple(x.shape)}")
    return x.unbind(axis)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] | None = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> Result:
    """flash-attn's `flash_attn_func`: q [B, S, Hq, D], k / v [B, S, Hk, D] -> out [B, S, Hq, D]."""
    _check_dense("q", q, 4, "[batch, seqlen, nheads, headdim]")
    _check_dense("k", k, 4, "[batch, seqlen, nheads_k, headdim]")
    _check_dense("v", v, 4, "[batch, seqlen, nheads_k, headdim]")
    B, S, H = q.shape[:3]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k, v must share the batch size, got {B}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != S or v.shape[1] != S:
        raise NotImplementedError(f"embedkit's flash_attn_func does not support cross-attention (seqlen_q = {S}, "
                                  f"seqlen_k = {k.shape[1]}); use flash-attn itself for this option")
    # B sequences of S tokens each, back to back: the varlen op on a regular cu_seqlens.
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device) if S else \
        torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    flat = lambda x: x.reshape(B * S, *x.shape[2:])  # noqa: E731
    res = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, S, S, dropout_p, softmax_scale, causal,
                                 window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    if isinstance(res, torch.Tensor):  # return_attn_probs=False
        return res.view(B, S, *res.shape[1:])
    out, lse, probs = res
    return out.view(B, S, *out.shape[1:]), lse.view(H, B, S).transpose(0, 1), probs


def flash_attn_qkvpacked_func(qkv: torch.Tensor,
                              dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                              window_size: tuple[int, int] | None = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                              return_attn_probs: bool = False) -> Result:
    """flash-attn's `flash_attn_qkvpacked_func`: qkv [B, S, 3, H, D] -> out [B, S, H, D]."""
    q, k, v = _packed("qkv", qkv, 3, 5, 2, "[batch, seqlen, 3, nheads, headdim]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor,
                             dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] | None = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False) -> Result:
    """flash-attn's `flash_attn_kvpacked_func`: q [B, S, Hq, D], kv [B, S, 2, Hk, D] -> out [B, S, Hq, D]."""
    k, v = _packed("kv", kv, 2, 5, 2, "[batch, seqlen, 2, nheads_k, headdim]")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                                     window_size: tuple[int, int] | None = (-1, -1), softcap: float = 0.0,
                                     alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                                     return_attn_probs: bool = False) -> Result:
    """flash-attn's `flash_attn_varlen_qkvpacked_func`: qkv [T, 3, H, D] -> out [T, H, D]."""
    q, k, v = _packed("qkv", qkv, 3, 4, 1, "[total, 3, nheads, headdim]")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                                    window_size: tuple[int, int] | None = (-1, -1), softcap: float = 0.0,
                                    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                                    return_attn_probs: bool = False) -> Result:
    """flash-attn's `flash_attn_varlen_kvpacked_func`: q [T, Hq, D], kv [T, 2, Hk, D] -> out [T, Hq, D]
    (self-attention: cu_seqlens_k must equal cu_seqlens_q)."""
    k, v = _packed("kv", kv, 2, 4, 1, "[total_k, 2, nheads_k, headdim]")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func"]
