"""embedkit: GPU kernels and a thin API for multimodal embedding encoders."""
from ._config import get_backend, set_backend, set_validation, use_backend, validation_enabled
from .batch import PackedBatch
from .ops import (BackendUnavailableError, available_backends, flash_attn_func, flash_attn_kvpacked_func,
                  flash_attn_qkvpacked_func, flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                  flash_attn_varlen_qkvpacked_func, masked_mean, nce_loss, pool_project, rotary_tables,
                  sequence_fingerprint, varlen_attention)
from .model import Audio, Embedder, EmbedderConfig, Image, Interleaved, ModelInputs, Text, Video

__version__ = "0.1.0"

__all__ = [
    # settings
    "get_backend", "set_backend", "set_validation", "use_backend", "validation_enabled",
    # ops
    "BackendUnavailableError", "available_backends", "flash_attn_func", "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func", "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func", "masked_mean", "nce_loss", "pool_project", "rotary_tables",
    "sequence_fingerprint", "varlen_attention",
    # data and model
    "PackedBatch", "Audio", "Embedder", "EmbedderConfig", "Image", "Interleaved", "ModelInputs", "Text", "Video",
]
