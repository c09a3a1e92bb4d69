"""Input validation shared by every op. Each error names the argument and what was expected.

Checks on shapes, dtypes and devices are free and always run. Checks on tensor *contents*
(cu_seqlens values, empty pools) need a device sync: they run when validation is enabled and
the code is not being traced by torch.compile. cu_seqlens contents are checked once per tensor
(and version): every later check of the same unchanged tensor, e.g. in each layer of a model, is
free (see `_validated` below).
"""
from __future__ import annotations

import weakref
from typing import Iterable, Sequence

import numpy as np
import torch

from .. import _config
from . import _varlen

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sync_checks_enabled() -> bool:
    return _config.validation_enabled() and not torch.compiler.is_compiling()


def check_tensor(
    x: object,
    name: str,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            # torch.cumsum of int32 lengths returns int64: say how to convert rather than just refuse
            # (the kernels read 4-byte offsets; a silent copy would hide a per-call cost).
            hint = ""
            if dtypes == (torch.int32,) and not x.dtype.is_floating_point and not x.dtype.is_complex \
                    and x.dtype != torch.bool:
                hint = f"; convert it with {name}.to(torch.int32) (torch.cumsum returns int64)"
            raise TypeError(f"{name} must have dtype in ({names}), got "
                            f"{str(x.dtype).replace('torch.', '')}{hint}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device} (mixed devices)")
    return x


def check_float(x: object, name: str, *, ndim: int | None = None, device: torch.device | None = None,
                allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    return check_tensor(x, name, ndim=ndim, dtypes=allowed, device=device)


def check_same_dtype(x: torch.Tensor, name: str, dtype: torch.dtype, other: str) -> None:
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {other} has {dtype}; they must match")


INT32_MAX = 2 ** 31 - 1

# ---- cu_seqlens facts, validated once per tensor ------------------------------------------------
# A model forward checks the same cu_seqlens in every layer. Its contents are read from the device
# once (one host sync) and remembered here, keyed by the tensor's identity and its version counter
# (bumped by every in-place write, through any view), so later checks of the unchanged tensor need
# no sync. A weak reference drops the entry with the tensor. Inference tensors have no version
# counter and are never remembered (PackedBatch keeps a normal tensor for this reason). Writes that
# bypass the version counter (through .numpy(), .data, DLPack or a raw kernel) are not seen.
_validated: dict[int, tuple[weakref.ref, int, int, int]] = {}


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _validated.get(key)
    if entry is not None and entry[0] is ref:
        del _validated[key]


def _recall(cu: torch.Tensor) -> tuple[int, int] | None:
    entry = _validated.get(id(cu))
    if entry is None or entry[0]() is not cu or entry[1] != _version(cu):
        return None
    return entry[2], entry[3]


def _remember(cu: torch.Tensor, last: int, longest: int) -> None:
    version = _version(cu)
    if version is None:
        return
    key = id(cu)
    ref = weakref.ref(cu, lambda r, key=key: _forget(key, r))
    _validated[key] = (ref, version, last, longest)


def _read_facts(cu: torch.Tensor) -> tuple[int, int, int, int]:
    """(cu[0], smallest step, largest step, cu[-1]) in int64 (no wrap-around), one host read."""
    c = cu.long()
    steps = c[1:] - c[:-1]
    first, low, high, last = torch.stack([c[0], steps.min(), steps.max(), c[-1]]).tolist()
    return first, low, high, last


def _validated_facts(cu: torch.Tensor, name: str) -> tuple[int, int]:
    """(cu[-1], longest length) of a cu_seqlens that starts at 0 and never decreases (so every entry
    lies in [0, cu[-1]]); raises naming `name` otherwise. Remembered per tensor version."""
    facts = _recall(cu)
    if facts is not None:
        return facts
    first, low, high, last = _read_facts(cu)
    if first != 0:
        raise ValueError(f"{name}[0] must be 0, got {first}")
    if low < 0:
        c = cu.long()
        i = int(torch.nonzero(c[1:] < c[:-1])[0, 0])
        raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = {int(c[i + 1])} "
                         f"< {name}[{i}] = {int(c[i])}")
    _remember(cu, last, high)
    return last, high


def seqlens_summary(cu_seqlens: torch.Tensor, name: str = "cu_seqlens") -> tuple[int, int]:
    """(total tokens cu[-1], longest sequence) of an int32 [B+1] cu_seqlens: checked (and then
    remembered, see above) when sync checks are on, else read as is in one host read."""
    if sync_checks_enabled():
        return _validated_facts(cu_seqlens, name)
    facts = _recall(cu_seqlens)
    if facts is not None:
        return facts
    _, _, high, last = _read_facts(cu_seqlens)
    return last, high


def check_cu_seqlens(cu_seqlens: object, total_tokens: int | None, device: torch.device | None,
                     name: str = "cu_seqlens") -> torch.Tensor:
    """int32 [B+1] on `device`: cu[0] == 0, non-decreasing, cu[-1] == total_tokens (so every entry
    lies in [0, T]); checked in int64 arithmetic. The content check syncs once per tensor version.
    Returns the caller's tensor itself: layout (contiguity) is the launchers' job, inside the custom ops."""
    cu = check_tensor(cu_seqlens, name, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 2:
        raise ValueError(f"{name} must have at least 2 entries ([B+1] with B >= 1), got {cu.numel()}")
    if sync_checks_enabled():
        last, _ = _validated_facts(cu, name)
        if total_tokens is not None and last != total_tokens:
            raise ValueError(f"{name}[-1] must equal the number of tokens T = {total_tokens}, got {last}")
    return cu


def check_max_seqlen(max_seqlen: object, cu_seqlens: torch.Tensor, name: str = "max_seqlen") -> int:
    """A Python int >= 0 (numpy ints accepted) and, with sync checks, >= the longest sequence of
    cu_seqlens (no extra sync after check_cu_seqlens of the same tensor)."""
    if isinstance(max_seqlen, (bool, np.bool_)) or not isinstance(max_seqlen, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {type(max_seqlen).__name__}")
    max_seqlen = int(max_seqlen)
    if max_seqlen < 0:
        raise ValueError(f"{name} must be >= 0, got {max_seqlen}")
    if max_seqlen > INT32_MAX:
        raise ValueError(f"{name} must be <= 2^31 - 1 (int32 token offsets), got {max_seqlen}")
    if sync_checks_enabled():
        _, longest = _validated_facts(cu_seqlens, "cu_seqlens")
        if max_seqlen < longest:
            raise ValueError(f"{name} = {max_seqlen} is below the longest sequence ({longest} tokens)")
    return max_seqlen


def check_int(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_pool_mask(pool_mask: object, cu_seqlens: torch.Tensor, total_tokens: int,
                    device: torch.device) -> torch.Tensor | None:
    """pool_mask: None or bool [T] on `device`; with sync checks, every sequence pools >= 1 token.
    Returns pool_mask itself, checked or not (the launchers make it contiguous)."""
    if pool_mask is not None:
        check_tensor(pool_mask, "pool_mask", ndim=1, dtypes=(torch.bool,), device=device)
        if pool_mask.shape[0] != total_tokens:
            raise ValueError(f"pool_mask must have T = {total_tokens} entries (hidden's rows), "
                             f"got {pool_mask.shape[0]}")
    if not sync_checks_enabled():
        return pool_mask
    cu = cu_seqlens
    if pool_mask is None:
        counts = cu[1:] - cu[:-1]
    else:
        counts = torch.zeros(cu.numel() - 1, dtype=torch.int64, device=device).index_add_(
            0, _varlen.segment_ids(cu, total_tokens), pool_mask.long())
    if bool((counts == 0).any()):
        i = int(torch.nonzero(counts == 0)[0, 0])
        why = "is empty" if pool_mask is None else "has no token with pool_mask True"
        raise ValueError(f"sequence {i} {why}: a mean over no pooled token is undefined")
    return pool_mask
