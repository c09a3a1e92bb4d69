"""The public ops. The backend modules register their backends with the dispatcher on import, and
each op module the backends it implements."""
from . import _native, _triton_backend  # noqa: F401  (registration: the "native" and "triton" backends)
from ._dispatch import BackendUnavailableError, available_backends
from .attention import flash_attn_varlen_func, rotary_tables, varlen_attention
from .fingerprint import sequence_fingerprint
from .flash_attn_compat import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func)
from .masked_mean import masked_mean
from .nce import nce_loss
from .packing import pack, unpack
from .pool_project import pool_project

__all__ = [
    "BackendUnavailableError", "available_backends", "flash_attn_func", "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func", "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func", "masked_mean", "nce_loss",
    "pack", "pool_project", "rotary_tables", "sequence_fingerprint", "unpack", "varlen_attention",
]
