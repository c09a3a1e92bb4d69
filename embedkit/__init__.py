"""embedkit: GPU kernels and a thin API for multimodal embedding encoders."""
from ._config import get_backend, set_backend, set_validation, use_backend, validation_enabled
from .batch import PackedBatch
from .ops import BackendUnavailableError, available_backends, pool_project, rotary_tables, varlen_attention
from .ops import nce_loss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "PackedBatch", "available_backends", "get_backend", "nce_loss", "pool_project",
    "rotary_tables", "set_backend", "set_validation", "use_backend", "validation_enabled", "varlen_attention",
]
