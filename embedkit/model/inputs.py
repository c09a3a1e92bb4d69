"""The Embedder's inputs: the user's segments (Text, Image, Video and Audio, interleaved in any
order) and ModelInputs, the packed token stream the Processor makes of them and forward reads.

Segments only hold and check what the user gave; turning them into tokens is the Processor's job.
Arrays may be NumPy arrays or torch tensors (anything with `__array__`, e.g. a PIL image, works
for Image too).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Union

import numpy as np
import torch

from .. import ops
from ..batch import PackedBatch

_PIXEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_WAVE_DTYPES = (torch.int16, torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIN_SAMPLE_RATE = 1000  # Hz: below this a rate is almost surely kHz (16 for 16 kHz), not a real recording


def _check_unit_range(x: torch.Tensor, what: str) -> None:
    """Float pixels are read as 0..1: values outside that (0..255 floats, or normalized by a mean and
    std already) would be silently misread, so they are refused, as are NaN and inf."""
    if x.dtype == torch.uint8 or x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 1.0):  # also false for NaN
        raise ValueError(f"{what} are float, so they must lie in [0, 1], got values in [{lo:g}, {hi:g}]: pass "
                         "uint8 for 0..255 pixels (or divide by 255); do not normalize them yourself (the "
                         "processor applies config.image_mean / image_std)")


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray) or hasattr(x, "__array__") or hasattr(x, "__array_interface__"):
        arr = np.asarray(x)
        if arr.dtype.kind not in "uif":
            raise TypeError(f"{what} must hold numbers, got an array of dtype {arr.dtype}")
        return torch.from_numpy(np.ascontiguousarray(arr))
    raise TypeError(f"{what} must be a NumPy array or a torch tensor, got {type(x).__name__}")


@dataclass(frozen=True, init=False)
class Text:
    """A piece of text."""
    text: str

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"Text takes a str, got {type(text).__name__}")
        object.__setattr__(self, "text", text)


@dataclass(frozen=True, init=False, eq=False)
class Image:
    """An image, H x W x C (C = 3 RGB, 1 grey, or 4 RGBA whose alpha is dropped).

    uint8 pixels are read as 0..255, float pixels as 0..1 (float values outside [0, 1] are a
    ValueError: 0..255 floats or pre-normalized pixels would be misread).
    """
    pixels: torch.Tensor

    def __init__(self, pixels):
        x = _as_tensor(pixels, "Image pixels")
        if x.dtype not in _PIXEL_DTYPES:
            raise TypeError(f"Image pixels must be uint8 (0..255) or float (0..1), got dtype {x.dtype}")
        if x.dim() != 3:
            raise ValueError(f"Image pixels must have shape [H, W, C] (rank 3), got shape {tuple(x.shape)}")
        if x.shape[-1] not in (1, 3, 4):
            raise ValueError(f"Image pixels must have 1, 3 or 4 channels last ([H, W, C]), got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"Image must not be empty, got shape {tuple(x.shape)}")
        _check_unit_range(x, "Image pixels")
        object.__setattr__(self, "pixels", x)


@dataclass(frozen=True, init=False, eq=False)
class Video:
    """A video, T x H x W x C frames (same pixel rules as Image)."""
    frames: torch.Tensor

    def __init__(self, frames):
        x = _as_tensor(frames, "Video frames")
        if x.dtype not in _PIXEL_DTYPES:
            raise TypeError(f"Video frames must be uint8 (0..255) or float (0..1), got dtype {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"Video frames must have shape [T, H, W, C] (rank 4), got shape {tuple(x.shape)}")
        if x.shape[-1] not in (1, 3, 4):
            raise ValueError(f"Video frames must have 1, 3 or 4 channels last, got shape {tuple(x.shape)}")
        if min(x.shape[:3]) == 0:
            raise ValueError(f"Video must not be empty, got shape {tuple(x.shape)}")
        _check_unit_range(x, "Video frames")
        object.__setattr__(self, "frames", x)


@dataclass(frozen=True, init=False, eq=False)
class Audio:
    """A waveform [N] (or [channels, N], mixed down to mono) at `sample_rate` Hz.

    int16 samples are scaled by 1/32768; float samples are read as -1..1 (not checked: the
    log-mel is computed in any case). sample_rate must be at least 1000 Hz (a value below that is
    almost surely kHz, e.g. 16 for 16 kHz); NaN / inf samples are refused.
    """
    waveform: torch.Tensor
    sample_rate: int

    def __init__(self, waveform, sample_rate: int):
        x = _as_tensor(waveform, "Audio waveform")
        if x.dtype not in _WAVE_DTYPES:
            raise TypeError(f"Audio waveform must be int16 or float, got dtype {x.dtype}")
        if x.dim() not in (1, 2):
            raise ValueError(f"Audio waveform must have shape [N] or [channels, N], got shape {tuple(x.shape)}")
        if x.shape[-1] == 0 or x.numel() == 0:
            raise ValueError(f"Audio waveform has length 0 (shape {tuple(x.shape)}): there is nothing to embed")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise ValueError(f"Audio sample_rate must be a positive int (Hz), got {sample_rate!r}")
        if sample_rate < MIN_SAMPLE_RATE:
            raise ValueError(f"Audio sample_rate is in Hz and must be at least {MIN_SAMPLE_RATE}, got {sample_rate} "
                             f"(for {sample_rate} kHz pass {int(sample_rate) * 1000})")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("Audio waveform holds NaN or inf samples")
        object.__setattr__(self, "waveform", x)
        object.__setattr__(self, "sample_rate", int(sample_rate))


Segment = Union[Text, Image, Video, Audio]
SEGMENT_TYPES = (Text, Image, Video, Audio)


class Interleaved:
    """One input to embed: a non-empty sequence of segments in any order and number.

    A bare str in the list is read as Text.
    """

    def __init__(self, segments: Iterable[Segment]):
        if isinstance(segments, (str, *SEGMENT_TYPES)):
            segments = [segments]
        try:
            segs = list(segments)
        except TypeError:
            raise TypeError(f"Interleaved takes a list of segments, got {type(segments).__name__}") from None
        if not segs:
            raise ValueError("Interleaved needs at least one segment, got an empty list")
        out = []
        for i, s in enumerate(segs):
            if isinstance(s, str):
                s = Text(s)
            if not isinstance(s, SEGMENT_TYPES):
                raise TypeError(f"segment {i} of Interleaved has unknown type {type(s).__name__}; expected "
                                "embedkit.Text, Image, Video or Audio (or a str)")
            out.append(s)
        self.segments: tuple[Segment, ...] = tuple(out)

    def __len__(self) -> int:
        return len(self.segments)

    def __iter__(self):
        return iter(self.segments)

    def __repr__(self) -> str:
        return f"Interleaved([{', '.join(type(s).__name__ for s in self.segments)}])"


def as_interleaved(item, index: int | None = None) -> Interleaved:
    """An Interleaved from an Interleaved, a single segment, a str, or a list of segments."""
    if isinstance(item, Interleaved):
        return item
    if isinstance(item, (str, *SEGMENT_TYPES)):
        return Interleaved([item])
    if isinstance(item, (list, tuple)):
        return Interleaved(item)
    where = "" if index is None else f"input {index}: "
    raise TypeError(f"{where}expected embedkit.Interleaved, a segment (Text, Image, Video, Audio), a str or a "
                    f"list of segments, got {type(item).__name__}")


def as_input_list(inputs) -> tuple[bool, list]:
    """(single, items): one input (Interleaved, segment, str) or a list / tuple / iterable of them."""
    if isinstance(inputs, (Interleaved, str, *SEGMENT_TYPES)):
        return True, [inputs]
    if isinstance(inputs, dict):
        raise TypeError("inputs must be an input or a list of inputs, got a dict (iterating it would embed "
                        "its keys): build one input with embedkit.Interleaved([embedkit.Text(...), "
                        "embedkit.Image(...)]), or pass list(d.values())")
    if inputs is None or isinstance(inputs, (bytes, bytearray, set, frozenset)) or not hasattr(inputs, "__iter__"):
        kind = "a set (its order is arbitrary)" if isinstance(inputs, (set, frozenset)) else type(inputs).__name__
        raise TypeError("inputs must be a str, an embedkit.Interleaved, a segment (Text, Image, Video, Audio) or "
                        f"a list of them, got {kind}")
    return False, list(inputs)


@dataclass
class ModelInputs:
    """What Embedder.forward reads: the packing plus the token ids and patch values.

    batch: PackedBatch with cu_seqlens, max_seqlen, position_ids [3, T], modality_ids [T], pool_mask [T].
    input_ids: int64 [T] (vocabulary ids; 0 at patch tokens, whose rows are replaced by patch embeddings).
    vision_patches [Nv, vision_patch_dim] at rows vision_index (int64 [Nv]) of the stream;
    audio_patches [Na, audio_patch_dim] at rows audio_index.
    """
    batch: PackedBatch
    input_ids: torch.Tensor
    vision_patches: torch.Tensor | None = None
    vision_index: torch.Tensor | None = None
    audio_patches: torch.Tensor | None = None
    audio_index: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return self.batch.batch_size

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModelInputs":
        """Moved to `device`; patch values cast to `dtype` (ids and indices keep theirs)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        mvf = lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return replace(self, batch=self.batch.to(device) if device is not None else self.batch,
                       input_ids=mv(self.input_ids), vision_patches=mvf(self.vision_patches),
                       vision_index=mv(self.vision_index), audio_patches=mvf(self.audio_patches),
                       audio_index=mv(self.audio_index))


def fingerprint_inputs(inputs) -> torch.Tensor:
    """int64 [B] content ids of packed ModelInputs: the token ids of each sequence, combined with the
    bytes of its image / video / audio patches (so two different images are never duplicates)."""
    cu = inputs.batch.cu_seqlens
    fp = ops.sequence_fingerprint(inputs.input_ids, cu)
    B = cu.shape[0] - 1
    for patches, index in ((inputs.vision_patches, inputs.vision_index), (inputs.audio_patches, inputs.audio_index)):
        if patches is None or patches.shape[0] == 0:
            continue
        seq = torch.searchsorted(cu[1:].to(index.dtype), index, right=True)
        order = torch.argsort(seq, stable=True)
        counts = torch.zeros(B, dtype=torch.long, device=seq.device).index_add_(0, seq, torch.ones_like(seq))  # no sync
        pcu = torch.zeros(B + 1, dtype=torch.int32, device=cu.device)
        pcu[1:] = torch.cumsum(counts, 0).to(torch.int32)
        fp = fp * 1_000_003 + ops.sequence_fingerprint(patches[order].contiguous(), pcu)  # wraps mod 2^64
    return fp
