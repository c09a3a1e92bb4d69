"""The multimodal Embedder: inputs, processor, transformer and pooling head."""
from .config import AUDIO, IMAGE, MODALITIES, SPECIAL_TOKENS, TEXT, VIDEO, EmbedderConfig
from .inputs import Audio, Image, Interleaved, ModelInputs, Text, Video
from .modeling import Embedder
from .processor import Processor
from .tokenizers import ByteTokenizer

__all__ = ["AUDIO", "IMAGE", "MODALITIES", "SPECIAL_TOKENS", "TEXT", "VIDEO", "Audio", "ByteTokenizer", "Embedder",
           "EmbedderConfig", "Image", "Interleaved", "ModelInputs", "Processor", "Text", "Video"]
