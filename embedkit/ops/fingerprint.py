"""sequence_fingerprint: a 64-bit content hash of each packed sequence, identical on every backend.

Token ids ([T] integers) are hashed by value (as int64, so int32 and int64 ids agree); any other
[T, ...] tensor by the raw bytes of its rows. Equal sequences get equal fingerprints, so the
result can serve as nce_loss's query_ids / target_ids (duplicate masking). The hash is defined in
csrc/include/embedkit.h: position-keyed 32-bit word terms summed mod 2^64, so the CUDA kernel's
parallel reduction, the C++ twin and the torch reference give the same bits.
"""
from __future__ import annotations

import torch

from . import _checks, _dispatch, _native, reference

OP = "sequence_fingerprint"
_dispatch.register_op(OP, {_native.NAME})

# 1-D tensors of these dtypes are token ids, hashed by value as int64 (int32 and int64 ids of the same
# text agree); any other tensor by its raw bytes. (The oracle in reference.py states the same rule.)
TOKEN_ID_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def fingerprint_rows(values: torch.Tensor) -> torch.Tensor:
    """The contiguous tensor whose raw row bytes are fingerprinted (1-D token ids widened to int64)."""
    if values.dim() == 1 and values.dtype in TOKEN_ID_DTYPES:
        values = values.to(torch.int64)
    return values.contiguous()


@torch.library.custom_op("embedkit::sequence_fingerprint", mutates_args=())
def _fingerprint(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    # Layout is made here, once, inside the op (the native wrapper refuses strided tensors).
    return _native.sequence_fingerprint(fingerprint_rows(values), cu_seqlens.contiguous())


@_fingerprint.register_fake
def _fingerprint_fake(values, cu_seqlens):
    return torch.empty(cu_seqlens.shape[0] - 1, dtype=torch.int64, device=values.device)


def sequence_fingerprint(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 [B]: a 64-bit fingerprint of each packed sequence of values [T, ...].

    values: token ids [T] (any integer dtype; hashed as int64 values) or a [T, ...] tensor of any
    dtype (hashed as the raw bytes of each sequence's rows); cu_seqlens int32 [B+1]. Equal sequences
    give equal fingerprints on every backend and device. Not cryptographic.
    """
    _checks.check_tensor(values, "values")
    if values.dim() < 1:
        raise ValueError("values must have a leading token dimension [T, ...], got a 0-d tensor")
    _checks.check_cu_seqlens(cu_seqlens, values.shape[0], values.device)
    backend = _dispatch.resolve(OP, values.device)
    if backend == "reference":
        return reference.sequence_fingerprint(values, cu_seqlens)
    return _fingerprint(values, cu_seqlens)
