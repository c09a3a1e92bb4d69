"""The public ops. Each module registers its backends with the dispatcher on import."""
from ._dispatch import BackendUnavailableError, available_backends
from .attention import rotary_tables, varlen_attention
from .nce import nce_loss
from .pool_project import pool_project
from .fingerprint import sequence_fingerprint
from .masked_mean import masked_mean
from .packing import pack, unpack

__all__ = ["BackendUnavailableError", "available_backends", "nce_loss", "pool_project", "rotary_tables",
           "varlen_attention"]
__all__ += ["masked_mean", "pack", "sequence_fingerprint", "unpack"]
