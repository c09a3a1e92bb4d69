"""embedkit: GPU kernels and a thin API for multimodal embedding encoders."""
from ._config import get_backend, set_backend, set_validation, use_backend, validation_enabled
from .batch import PackedBatch
from .ops import BackendUnavailableError, available_backends, pool_project, rotary_tables, varlen_attention
from .ops import nce_loss
from .ops import masked_mean, sequence_fingerprint

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "PackedBatch", "available_backends", "get_backend", "nce_loss", "pool_project",
    "rotary_tables", "set_backend", "set_validation", "use_backend", "validation_enabled", "varlen_attention",
]

# The multimodal Embedder (issue 7).
from .model import Audio, Embedder, EmbedderConfig, Image, Interleaved, ModelInputs, Text, Video  # noqa: E402

__all__ += ["Audio", "Embedder", "EmbedderConfig", "Image", "Interleaved", "ModelInputs", "Text", "Video"]
__all__ += ["masked_mean", "sequence_fingerprint"]
