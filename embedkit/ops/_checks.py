"""Input validation shared by every op. Each error names the argument and what was expected.

Checks on shapes, dtypes and devices are free and always run. Checks on tensor *contents*
(cu_seqlens values, empty pools) need a device sync: they run when validation is enabled and
the code is not being traced by torch.compile.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .. import _config

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
            raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device} (mixed devices)")
    return x


def check_float(x: object, name: str, *, ndim: int | None = None, device: torch.device | None = None,
                allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    return check_tensor(x, name, ndim=ndim, dtypes=allowed, device=device)


def check_same_dtype(x: torch.Tensor, name: str, dtype: torch.dtype, other: str) -> None:
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {other} has {dtype}; they must match")


def check_cu_seqlens(cu_seqlens: object, total_tokens: int | None, device: torch.device | None,
                     name: str = "cu_seqlens") -> torch.Tensor:
    """int32 [B+1] on `device`, starting at 0, non-decreasing, ending at total_tokens."""
    cu = check_tensor(cu_seqlens, name, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 2:
        raise ValueError(f"{name} must have at least 2 entries ([B+1] with B >= 1), got {cu.numel()}")
    if sync_checks_enabled():
        steps = cu[1:] - cu[:-1]
        # One host read for the three facts (each a sync on a GPU); details only on failure.
        first, n_decreasing, last = torch.stack([cu[0], (steps < 0).sum(dtype=cu.dtype), cu[-1]]).tolist()
        if first != 0:
            raise ValueError(f"{name}[0] must be 0, got {first}")
        if n_decreasing:
            i = int(torch.nonzero(steps < 0)[0, 0])
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = {int(cu[i + 1])} "
                             f"< {name}[{i}] = {int(cu[i])}")
        if total_tokens is not None and last != total_tokens:
            raise ValueError(f"{name}[-1] must equal the number of tokens T = {total_tokens}, got {last}")
    # Kernels index cu_seqlens with stride 1: a strided view is copied (free when contiguous).
    return cu.contiguous()


def check_max_seqlen(max_seqlen: object, cu_seqlens: torch.Tensor, name: str = "max_seqlen") -> int:
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{name} must be a Python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{name} must be >= 0, got {max_seqlen}")
    if sync_checks_enabled():
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
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
    Returns the mask contiguous (kernels index it with stride 1)."""
    if pool_mask is not None:
        check_tensor(pool_mask, "pool_mask", ndim=1, dtypes=(torch.bool,), device=device)
        if pool_mask.shape[0] != total_tokens:
            raise ValueError(f"pool_mask must have T = {total_tokens} entries (hidden's rows), "
                             f"got {pool_mask.shape[0]}")
    if not sync_checks_enabled():
        return
    cu = cu_seqlens
    if pool_mask is None:
        counts = cu[1:] - cu[:-1]
    else:
        from .reference import segment_ids

        counts = torch.zeros(cu.numel() - 1, dtype=torch.int64, device=device).index_add_(
            0, segment_ids(cu, total_tokens), pool_mask.long())
    if bool((counts == 0).any()):
        i = int(torch.nonzero(counts == 0)[0, 0])
        why = "is empty" if pool_mask is None else "has no token with pool_mask True"
        raise ValueError(f"sequence {i} {why}: a mean over no pooled token is undefined")
    return None if pool_mask is None else pool_mask.contiguous()
