"""varlen_attention, rotary_tables and the flash-attn drop-in flash_attn_varlen_func.

Three layers (as flash-attn does): torch.library custom ops `embedkit::varlen_attention_fwd` /
`_bwd` with fake implementations (torch.compile traces them without running a kernel) -> autograd
registration -> the public functions, which validate inputs and pick the backend.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence, cast

import torch

from . import _checks, _dispatch, _triton_backend, reference

OP = "varlen_attention"
_dispatch.register_op(OP, {_triton_backend.NAME})

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _kernels(backend: str):
    if backend == "triton":
        from embedkit._triton import attention as kernels

        return kernels
    raise AssertionError(f"no {backend} kernels for {OP}")


def _as_bool(value, name: str) -> bool:
    """A Python bool or a NumPy bool_ (what a config read through NumPy hands over) -> bool."""
    if isinstance(value, bool) or type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    kind = type(value)
    raise TypeError(f"{name} must be a bool, got {kind.__module__}.{kind.__qualname__}"
                    if kind.__module__ != "builtins" else f"{name} must be a bool, got {kind.__name__}")


def _as_int(value):
    """NumPy integers (not bools) become Python ints; anything else is left for the checks."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__module__ == "numpy":
        return int(value)
    return value


def _rotary(cos, sin):
    return None if cos is None else (cos, sin)


# ---- custom ops -------------------------------------------------------------------------------

@torch.library.custom_op("embedkit::varlen_attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
         causal: bool, softmax_scale: float, cos: torch.Tensor | None, sin: torch.Tensor | None,
         backend: str, deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic only matters to the backward (kept by _setup_context); the forward has no atomics.
    return _kernels(backend).attention_fwd(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale,
                                           _rotary(cos, sin))


@_fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, cos, sin, backend, deterministic=True):
    T, Hq, D = q.shape
    return q.new_empty(T, Hq, D), torch.empty(Hq, T, dtype=torch.float32, device=q.device)


@torch.library.custom_op("embedkit::varlen_attention_bwd", mutates_args=())
def _bwd(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
         v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
         causal: bool, softmax_scale: float, cos: torch.Tensor | None, sin: torch.Tensor | None,
         backend: str, deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels(backend).attention_bwd(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens, max_seqlen,
                                           causal, softmax_scale, _rotary(cos, sin), deterministic=deterministic)


@_bwd.register_fake
def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, cos, sin,
              backend, deterministic=True):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, cos, sin, backend, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cos, sin)
    ctx.max_seqlen = max_seqlen
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale
    ctx.backend = backend
    ctx.deterministic = rest[0] if rest else True
    # An unused lse gets grad None (not materialized zeros): the kernels then skip the dlse term
    # and keep single-key rows' dS exactly 0.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, cos, sin = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _bwd(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal,
                      ctx.softmax_scale, cos, sin, ctx.backend, ctx.deterministic)
    # The rotary tables are constants of the op (no gradient), like cu_seqlens.
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("embedkit::varlen_attention_fwd", _backward, setup_context=_setup_context)


# ---- validation -------------------------------------------------------------------------------

def _validate(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, rotary):
    floats = _KERNEL_DTYPES + (torch.float64,)
    q = _checks.check_float(q, "q", ndim=3, allowed=floats)
    dev = q.device
    k = _checks.check_float(k, "k", ndim=3, device=dev, allowed=floats)
    v = _checks.check_float(v, "v", ndim=3, device=dev, allowed=floats)
    _checks.check_same_dtype(k, "k", q.dtype, "q")
    _checks.check_same_dtype(v, "v", q.dtype, "q")
    T, Hq, D = q.shape
    if k.shape[0] != T:
        raise ValueError(f"k must have T = {T} tokens (q's first dim) for self-attention over packed "
                         f"sequences, got shape {tuple(k.shape)}")
    if k.shape[2] != D:
        raise ValueError(f"k must have head dim D = {D} (q's last dim), got shape {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hq == 0 or Hkv == 0:
        raise ValueError(f"q and k must have at least one head, got Hq = {Hq}, Hkv = {Hkv}")
    if Hq % Hkv:
        raise ValueError(f"the number of query heads Hq = {Hq} (q.shape[1]) must be a multiple of the "
                         f"number of kv heads Hkv = {Hkv} (k.shape[1]) for GQA / MQA")
    if D == 0 or D > MAX_HEAD_DIM:
        # Any D in [1, 256] runs: the kernels pad the head dim to a power-of-two tile with masks.
        raise ValueError(f"head dim D = q.shape[2] must be between 1 and {MAX_HEAD_DIM} (up to 256), got {D}")
    cu = _checks.check_cu_seqlens(cu_seqlens, T, dev)
    max_seqlen = _checks.check_max_seqlen(_as_int(max_seqlen), cu)
    _as_bool(causal, "causal")
    if softmax_scale is None:
        softmax_scale = D ** -0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    elif not (softmax_scale > 0 and softmax_scale != float("inf")):
        raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale}")
    if rotary is not None:
        if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
            raise TypeError("rotary must be a (cos, sin) pair of tensors [T, R/2] (see rotary_tables), "
                            f"got {type(rotary).__name__}")
        cos, sin = rotary
        _checks.check_float(cos, "rotary cos", ndim=2, device=dev)
        _checks.check_float(sin, "rotary sin", ndim=2, device=dev)
        if tuple(sin.shape) != tuple(cos.shape):
            raise ValueError(f"rotary cos and sin must have the same shape, got {tuple(cos.shape)} and "
                             f"{tuple(sin.shape)}")
        if cos.shape[0] != T:
            raise ValueError(f"rotary cos / sin must have T = {T} rows (one per packed token), "
                             f"got shape {tuple(cos.shape)}")
        if cos.shape[1] < 1 or 2 * cos.shape[1] > D:
            raise ValueError(f"rotary cos / sin must have R/2 columns with 2 <= R <= D = {D}, "
                             f"got shape {tuple(cos.shape)} (R = {2 * cos.shape[1]})")
    return max_seqlen, float(softmax_scale), cu


def rotary_tables(position_ids: torch.Tensor, rotary_dim: int, theta: float = 10000.0,
                  sections: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) fp32 [T, rotary_dim / 2] from position ids [T] or [3, T] (then `sections`)."""
    _checks.check_tensor(position_ids, "position_ids", dtypes=(torch.int32, torch.int64))
    _checks.check_int(rotary_dim, "rotary_dim", low=2)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real):
        raise TypeError(f"theta must be a finite number > 0, got {type(theta).__name__}")
    if not (theta > 0 and theta < math.inf):  # (math.isfinite fails on torch.compile's symbolic floats)
        raise ValueError(f"theta must be a finite number > 0, got {theta!r}")
    if position_ids.dim() == 2 and position_ids.shape[0] == 3:
        if (sections is None or len(sections) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                           for s in sections)
                or 2 * sum(sections) != rotary_dim):
            raise ValueError(f"sections must be 3 ints >= 0 summing to rotary_dim / 2 = {rotary_dim // 2} for "
                             f"position_ids of shape [3, T], got {sections!r}")
    elif position_ids.dim() != 1:
        raise ValueError(f"position_ids must have shape [T] or [3, T], got {tuple(position_ids.shape)}")
    return reference.rotary_tables(position_ids, rotary_dim, theta, sections)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
                     causal: bool = False, softmax_scale: float | None = None,
                     rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                     return_lse: bool = False, deterministic: bool = True
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention within each packed sequence (flash-attn varlen layout).

    q [T, Hq, D], k / v [T, Hkv, D] (Hq % Hkv == 0; D from 1 to 256), fp16 / bf16 /
    fp32; cu_seqlens int32 [B+1]; max_seqlen a Python int >= the longest sequence. Bidirectional
    unless `causal`; default scale D ** -0.5. rotary=(cos, sin), each [T, R/2] (rotary_tables):
    rotate-half rotary on the first R dims of q and k, inside the kernel. Returns out [T, Hq, D]
    and, with return_lse, lse fp32 [Hq, T] (natural log). Differentiable in q, k, v (and through
    lse).

    deterministic (default True): the backward is bit-reproducible (no atomics). False lets the
    Triton backend use its one-kernel backward on sequences longer than one tile (5 matrix products
    instead of 7, dq summed with fp32 atomics: not bit-reproducible run to run). The reference backend
    (the only other one of this op) is deterministic either way and ignores it.
    """
    # cu_seqlens goes to the custom op as given; the launchers make it contiguous at run time.
    causal = _as_bool(causal, "causal")
    deterministic = _as_bool(deterministic, "deterministic")
    max_seqlen, scale, _ = _validate(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, rotary)
    backend = _dispatch.resolve(OP, q.device)
    if backend == "reference":  # a custom op too, so torch.compile never traces its per-sequence loop
        from . import _reference_attention_op

        return _reference_attention_op.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal,
                                                        softmax_scale=scale, rotary=rotary, return_lse=return_lse)
    if q.dtype == torch.float64:
        raise TypeError(f"q: the {backend} backend of {OP} takes float16, bfloat16 or float32, "
                        "got float64 (use backend 'reference' for float64)")
    cos, sin = (None, None) if rotary is None else rotary
    out, lse = _fwd(q, k, v, cu_seqlens, max_seqlen, causal, scale, cos, sin, backend, deterministic)
    return (out, lse) if return_lse else out


# ---- flash-attn drop-in -----------------------------------------------------------------------

def _same_view(a, b) -> bool:
    """a and b are two views of the same memory with the same layout: equal without reading them
    (torch.equal would sync the device on every layer)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device == b.device
            and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()):
        return False
    try:
        return a.data_ptr() == b.data_ptr()
    except RuntimeError:  # fake / functional tensors under tracing have no storage to compare
        return False


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] | None = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: torch.Tensor | None = None
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flash-attn's `flash_attn_varlen_func`, for self-attention over packed sequences.

    Supported: cu_seqlens_q equal to cu_seqlens_k (self-attention), softmax_scale, causal, GQA / MQA,
    deterministic (flash-attn 2's meaning: False, the default, allows atomics -- the Triton backend then
    takes its one-kernel backward with dq summed by atomics on sequences longer than one tile; True
    keeps the bit-reproducible backward). return_attn_probs=True returns
    (out, softmax_lse [Hq, T], an empty tensor) like flash-attn 2 without dropout. Anything else raises
    NotImplementedError.
    """
    def unsupported(what):
        raise NotImplementedError(f"embedkit's flash_attn_varlen_func does not support {what}; "
                                  "use flash-attn itself for this option")

    if dropout_p != 0.0:
        unsupported(f"dropout_p > 0 (got {dropout_p}): attention dropout is not implemented")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), (-1, -1) for no window, "
                        f"got {window_size!r}")
    if tuple(int(w) for w in window_size) != (-1, -1):
        unsupported(f"window_size={tuple(window_size)} (sliding-window / local attention)")
    if softcap != 0.0:
        unsupported(f"softcap={softcap} (logit soft-capping)")
    if alibi_slopes is not None:
        unsupported("alibi_slopes (ALiBi biases)")
    if block_table is not None:
        unsupported("block_table (paged KV cache)")
    deterministic = _as_bool(deterministic, "deterministic")
    max_seqlen_q, max_seqlen_k = _as_int(max_seqlen_q), _as_int(max_seqlen_k)
    if cu_seqlens_k is not cu_seqlens_q and not _same_view(cu_seqlens_k, cu_seqlens_q):
        _checks.check_tensor(cu_seqlens_k, "cu_seqlens_k", ndim=1, dtypes=(torch.int32,))
        if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_k.shape != cu_seqlens_q.shape:
            unsupported("cu_seqlens_k different from cu_seqlens_q (cross-attention)")
        # Not a sanity check but an unsupported feature: always checked, even with validation off.
        if not torch.equal(cu_seqlens_k, cu_seqlens_q.to(cu_seqlens_k.device)):
            unsupported("cu_seqlens_k different from cu_seqlens_q (cross-attention)")
    if max_seqlen_k != max_seqlen_q:
        unsupported(f"max_seqlen_k = {max_seqlen_k} different from max_seqlen_q = {max_seqlen_q} "
                    "(cross-attention)")
    if return_attn_probs:
        out, lse = varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, causal=causal,
                                    softmax_scale=softmax_scale, return_lse=True, deterministic=deterministic)
        # flash-attn 2 without dropout returns an empty S_dmask in the third slot.
        return out, lse, torch.empty(0, dtype=q.dtype, device=q.device)
    return cast(torch.Tensor, varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, causal=causal,
                                               softmax_scale=softmax_scale, deterministic=deterministic))
