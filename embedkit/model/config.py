"""EmbedderConfig: every size and switch of the Embedder and its Processor, saved as JSON."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

# Modality ids carried in PackedBatch.modality_ids. Start/end tokens carry their segment's id.
TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3
MODALITIES = {"text": TEXT, "image": IMAGE, "video": VIDEO, "audio": AUDIO}

# Modality start/end tokens: extra rows appended after the text vocabulary, in this order.
SPECIAL_TOKENS = ("image_start", "image_end", "video_start", "video_end", "audio_start", "audio_end")


_BOOL_FIELDS = ("mlp_gated", "attention_bias", "output_bias", "mlp_bias", "qk_norm", "projection_bias")
_INT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "intermediate_size", "max_position_embeddings", "out_dim", "max_seq_len", "patch_size",
               "temporal_patch_size", "image_channels", "max_image_side", "max_image_tokens", "max_video_frames",
               "audio_mels", "audio_frames_per_patch")
_STR_FIELDS = ("block_style", "norm_type", "hidden_act", "position_embedding", "task_template")
_FLOAT_FIELDS = ("norm_eps", "norm_offset", "embed_scale", "rope_theta", "audio_fmax")
# Upper bounds: far above any real model, low enough that a corrupt or hostile config.json is
# refused before the Embedder allocates (vocab_size 1e9 would be 256 GB of embeddings).
MAX_VOCAB_SIZE = 2 ** 24
MAX_EMBEDDING_ELEMENTS = 2 ** 32
_MAX_INT = dict(vocab_size=MAX_VOCAB_SIZE, hidden_size=2 ** 16, num_layers=1024, num_heads=1024,
                num_kv_heads=1024, head_dim=1024, intermediate_size=2 ** 18, out_dim=2 ** 16,
                max_seq_len=2 ** 24, patch_size=1024, temporal_patch_size=64, max_image_side=2 ** 16,
                max_image_tokens=2 ** 20, max_video_frames=2 ** 16, audio_mels=4096,
                audio_frames_per_patch=1024, max_position_embeddings=2 ** 24)


def default_mrl_dims(out_dim: int) -> tuple[int, ...]:
    """The MRL prefixes of a fresh projection to out_dim: out_dim / 4, out_dim / 2 and out_dim."""
    return tuple(sorted({max(1, out_dim // 4), max(1, out_dim // 2), out_dim}))


@dataclass
class EmbedderConfig:
    # ---- backbone ----
    vocab_size: int = 151936            # text vocabulary (the embedding table adds len(SPECIAL_TOKENS) rows)
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2               # GQA: num_heads % num_kv_heads == 0
    head_dim: int = 64
    intermediate_size: int = 4864
    # "pre_norm": RMSNorm -> attention -> residual, RMSNorm -> gated MLP -> residual, final norm
    #             (Llama / Qwen / Gemma). "post_norm": BERT blocks (residual then LayerNorm, plain
    #             MLP, a LayerNorm on the embeddings, no final norm), for encoder checkpoints.
    block_style: str = "pre_norm"
    norm_type: str = "rms"              # "rms" | "layer"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0            # Gemma stores RMSNorm weights as (w - 1): scale = w + norm_offset
    hidden_act: str = "silu"            # "silu" | "gelu_tanh" | "gelu"
    mlp_gated: bool = True              # SwiGLU / GeGLU (gate, up, down) or plain (up, down)
    attention_bias: bool = False        # bias on q, k, v (Qwen2, BERT)
    output_bias: bool = False           # bias on the attention output projection (BERT)
    mlp_bias: bool = False
    qk_norm: bool = False               # RMSNorm over head_dim on q and k (Qwen3)
    embed_scale: float = 1.0            # Gemma multiplies token embeddings by sqrt(hidden_size)
    softmax_scale: float | None = None  # None: head_dim ** -0.5
    position_embedding: str = "rope"    # "rope" (multimodal, 3 axes) | "learned" (absolute, 1 axis)
    rope_theta: float = 1000000.0
    rotary_dim: int | None = None       # None: head_dim
    rope_sections: tuple[int, int, int] | None = None  # frequencies per (t, h, w) axis; None: 1/4, 3/8, 3/8
    max_position_embeddings: int = 32768
    # ---- pooling head ----
    out_dim: int = 3072
    mrl_dims: tuple[int, ...] = (768, 1536, 3072)
    projection_bias: bool = False
    # ---- processor ----
    tokenizer: str | None = "bytes"     # "bytes" (built in), a Hugging Face tokenizer path, or None
    max_seq_len: int = 32768            # tokens per item (task + segments + special tokens)
    patch_size: int = 16
    temporal_patch_size: int = 2        # video frames per patch; an image is repeated to fill one
    image_channels: int = 3
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_image_side: int = 1792          # longer image / frame side is downscaled to this
    max_image_tokens: int = 4096        # patches per image / per video frame group, downscaled to fit
    max_video_frames: int = 64          # longer videos are subsampled uniformly to this many frames
    audio_mels: int = 128
    audio_frames_per_patch: int = 4     # 10 ms frames -> 25 audio tokens per second
    audio_fmax: float = 8000.0
    task_template: str = "task: {task} | "

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        """Every field by type (and finiteness), before any range check, naming the field: a
        config.json may say "false" for a bool or "abc" for a list."""
        def bad(name: str, what: str) -> None:
            raise TypeError(f"EmbedderConfig: {name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def as_float(name: str, v, *, optional: bool = False):
            if v is None and optional:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad(name, "a number" + (" or None" if optional else ""))
            v = float(v)
            if not math.isfinite(v):
                raise ValueError(f"EmbedderConfig: {name} must be finite, got {v!r}")
            return v

        def int_tuple(name: str, v, *, optional: bool = False):
            if v is None and optional:
                return None
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or not all(is_int(d) for d in v):
                bad(name, "a list of ints" + (" or None" if optional else ""))
            return tuple(v)

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _BOOL_FIELDS and not isinstance(v, bool):
                bad(f.name, "true or false (a bool, not a string or number)")
            if f.name in _INT_FIELDS and not is_int(v):
                bad(f.name, "an int")
            if f.name in _STR_FIELDS and not isinstance(v, str):
                bad(f.name, "a string")
        for name in _FLOAT_FIELDS:
            setattr(self, name, as_float(name, getattr(self, name)))
        self.softmax_scale = as_float("softmax_scale", self.softmax_scale, optional=True)
        if self.rotary_dim is not None and not is_int(self.rotary_dim):
            bad("rotary_dim", "an int or None")
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            bad("tokenizer", "'bytes', a path or None")
        self.rope_sections = int_tuple("rope_sections", self.rope_sections, optional=True)
        self.mrl_dims = int_tuple("mrl_dims", self.mrl_dims)
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
                bad(name, "a list of 3 numbers")
            setattr(self, name, tuple(as_float(name, x) for x in v))

    # ---- derived ----
    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def sections(self) -> tuple[int, int, int]:
        if self.rope_sections is not None:
            return self.rope_sections
        half = self.rope_dim // 2
        t = half // 4
        h = (half - t) // 2
        return (t, h, half - t - h)

    @property
    def num_special_tokens(self) -> int:
        return len(SPECIAL_TOKENS)

    def special_token_id(self, name: str) -> int:
        return self.vocab_size + SPECIAL_TOKENS.index(name)

    @property
    def vision_patch_dim(self) -> int:
        return self.temporal_patch_size * self.image_channels * self.patch_size ** 2

    @property
    def audio_patch_dim(self) -> int:
        return self.audio_mels * self.audio_frames_per_patch

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"EmbedderConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "out_dim", "max_seq_len", "patch_size", "temporal_patch_size",
                     "max_image_side", "max_image_tokens", "max_video_frames", "audio_mels",
                     "audio_frames_per_patch", "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive int, got {v!r}")
            need(v <= _MAX_INT[name], f"{name} must be <= {_MAX_INT[name]} (a documented bound that stops an "
                 f"absurd config from allocating before any weight is read), got {v!r}")
        need((self.vocab_size + len(SPECIAL_TOKENS)) * self.hidden_size <= MAX_EMBEDDING_ELEMENTS,
             f"vocab_size x hidden_size must be <= {MAX_EMBEDDING_ELEMENTS} elements, got "
             f"{self.vocab_size} x {self.hidden_size}")
        need(0 < self.norm_eps < 1, f"norm_eps must lie in (0, 1), got {self.norm_eps!r}")
        need(self.embed_scale > 0, f"embed_scale must be > 0, got {self.embed_scale!r}")
        need(self.softmax_scale is None or self.softmax_scale > 0,
             f"softmax_scale must be > 0 or None, got {self.softmax_scale!r}")
        need(self.rope_theta > 1, f"rope_theta must be > 1, got {self.rope_theta!r}")
        need(self.audio_fmax > 0, f"audio_fmax must be > 0, got {self.audio_fmax!r}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        need(self.block_style in ("pre_norm", "post_norm"), f"block_style must be 'pre_norm' or 'post_norm', "
             f"got {self.block_style!r}")
        need(self.norm_type in ("rms", "layer"), f"norm_type must be 'rms' or 'layer', got {self.norm_type!r}")
        need(self.hidden_act in ("silu", "gelu_tanh", "gelu"), f"hidden_act must be 'silu', 'gelu_tanh' or "
             f"'gelu', got {self.hidden_act!r}")
        need(self.position_embedding in ("rope", "learned"),
             f"position_embedding must be 'rope' or 'learned', got {self.position_embedding!r}")
        if self.position_embedding == "rope":
            r = self.rope_dim
            need(r % 2 == 0 and 2 <= r <= self.head_dim, f"rotary_dim must be even and <= head_dim, got {r}")
            s = self.sections
            need(len(s) == 3 and sum(s) == r // 2 and min(s) >= 0,
                 f"rope_sections must be 3 ints summing to rotary_dim / 2 = {r // 2}, got {s}")
        else:
            need(self.max_seq_len <= self.max_position_embeddings,
                 f"max_seq_len ({self.max_seq_len}) must be <= max_position_embeddings "
                 f"({self.max_position_embeddings}) with learned positions")
        need(len(self.mrl_dims) > 0 and list(self.mrl_dims) == sorted(set(self.mrl_dims))
             and self.mrl_dims[-1] == self.out_dim and self.mrl_dims[0] > 0,
             f"mrl_dims must be increasing and end at out_dim = {self.out_dim}, got {self.mrl_dims}")
        need(self.image_channels == 3, f"image_channels must be 3, got {self.image_channels}")
        need(len(self.image_mean) == 3 and len(self.image_std) == 3 and min(self.image_std) > 0,
             "image_mean / image_std must be 3 floats (std > 0)")
        need(self.max_image_side >= self.patch_size, "max_image_side must be >= patch_size")

    # ---- presets ----
    @classmethod
    def tiny(cls, **overrides) -> "EmbedderConfig":
        """A few hundred thousand parameters (most in the 3072-wide projection): CPU tests, no download."""
        base = dict(vocab_size=259, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=128, rope_theta=10000.0, max_position_embeddings=1024, max_seq_len=1024,
                    tokenizer="bytes", patch_size=4, temporal_patch_size=2, max_image_side=64,
                    max_image_tokens=64, max_video_frames=8, audio_mels=16, audio_frames_per_patch=4,
                    audio_fmax=4000.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def base_0p5b(cls, **overrides) -> "EmbedderConfig":
        """~0.5B parameters, the shape of Qwen2-0.5B (the benchmark's size)."""
        base = dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                    intermediate_size=4864, rope_theta=1000000.0)
        base.update(overrides)
        return cls(**base)

    # ---- JSON ----
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EmbedderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"EmbedderConfig: unknown fields {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "EmbedderConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

