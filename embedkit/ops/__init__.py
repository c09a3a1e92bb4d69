"""The public ops. Each module registers its backends with the dispatcher on import."""
from ._dispatch import BackendUnavailableError, available_backends
from .attention import rotary_tables, varlen_attention
from .pool_project import pool_project

__all__ = ["BackendUnavailableError", "available_backends", "pool_project", "rotary_tables",
           "varlen_attention"]

from .attention import flash_attn_varlen_func  # noqa: E402

__all__ += ["flash_attn_varlen_func"]
