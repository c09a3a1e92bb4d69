"""The Processor: Interleaved inputs -> one packed token stream (ModelInputs).

Every item becomes one packed sequence:

    [bos] [task tokens] segment segment ... [eos]

- Text: the tokenizer's ids (no special tokens of its own), modality TEXT.
- Image: <image_start> patches <image_end>. The image is resized (bilinear, antialiased) so that
  each side is a multiple of `patch_size` (nearest multiple, at least one patch). Documented
  downscaling: a longer side above `max_image_side` is scaled down to it first (aspect kept), and
  an image with more than `max_image_tokens` patches is scaled down until it fits. Each patch of
  `patch_size`^2 pixels is repeated to `temporal_patch_size` frames (so images and videos share
  one patch embedder) and flattened to `temporal_patch_size * 3 * patch_size^2` values.
- Video: <video_start> patches <video_end>, frames grouped by `temporal_patch_size` (the last frame
  is repeated to fill the last group); frames resized like an image; a video with more than
  `max_video_frames` frames is subsampled uniformly to that many (documented downscaling).
- Audio: <audio_start> patches <audio_end>: a log-mel spectrogram (25 ms Hann window, 10 ms hop,
  `audio_mels` HTK mel bands up to min(audio_fmax, sample_rate / 2), Whisper-style log
  compression), computed at the input's own sample rate (window and hop are set in seconds, so no
  resampling is needed), cut into patches of `audio_frames_per_patch` frames.
- The task string (optional) is tokenized from `task_template` and attended to, but its tokens
  have pool_mask False; every other token (bos / eos / start / end tokens included) is pooled.

Positions are 3-axis (temporal, height, width), Qwen2-VL style, with a running offset p that
starts at 0: a text or special token gets (p, p, p) and advances p by 1; a vision patch at grid
cell (t, h, w) gets (p + t, p + h, p + w) and the segment advances p by max(grid); audio patch i
gets (p + i, p + i, p + i). Text-only inputs therefore get plain 1-D positions.

An item with more than `max_seq_len` tokens is an error (ValueError naming the item), unless
`item(..., truncate=True)` (what Embedder.encode does by default) cuts its trailing text tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batch import PackedBatch
from . import config as C
from .features import (audio_patches, fit_image_size, log_mel_spectrogram, mel_filterbank, resize_frames,
                       to_frames, vision_patches, vision_positions)
from .inputs import Audio, Image, ModelInputs, Text, Video, as_input_list, as_interleaved
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

# Re-exported: they lived here before the tokenizers, the feature math and ModelInputs got files
# of their own, and `from embedkit.model.processor import ...` of them keeps working.
__all__ = ["ByteTokenizer", "HFTokenizer", "ModelInputs", "Processor", "audio_patches", "fit_image_size",
           "load_tokenizer", "log_mel_spectrogram", "mel_filterbank", "vision_patches", "vision_positions"]


# ---- one item, before packing -------------------------------------------------------------------

@dataclass
class _Item:
    """One item's tokens before packing."""
    ids: list = field(default_factory=list)          # int64 tensors
    modality: list = field(default_factory=list)     # int8 tensors
    pool: list = field(default_factory=list)         # bool tensors
    pos: list = field(default_factory=list)          # int64 [3, n] tensors
    vision: list = field(default_factory=list)       # (offset within item, patches)
    audio: list = field(default_factory=list)
    length: int = 0
    next_pos: int = 0

    def add_ids(self, ids, modality: int, pooled: bool = True) -> None:
        n = len(ids)
        if n == 0:
            return
        self.ids.append(torch.as_tensor(ids, dtype=torch.int64))
        self.modality.append(torch.full((n,), modality, dtype=torch.int8))
        self.pool.append(torch.full((n,), pooled, dtype=torch.bool))
        self.pos.append((self.next_pos + torch.arange(n, dtype=torch.int64)).expand(3, n))
        self.length += n
        self.next_pos += n

    def truncate(self, n: int, where: str) -> None:
        """Keep the first n tokens. Only text is cut: dropping any image / video / audio token (a
        start / end token or a patch) is refused, since half a segment is not that segment."""
        if n >= self.length:
            return
        modality = torch.cat(self.modality)
        if bool((modality[n:] != C.TEXT).any()):
            raise ValueError(f"{where} has {self.length} tokens, more than max_seq_len allows, and truncation "
                             "would cut an image / video / audio segment (only text is truncated): shorten "
                             "the input or downscale its media (max_image_tokens, max_video_frames)")
        start = 0
        for kept, mod in enumerate(self.modality, 1):
            if start + mod.shape[0] >= n:
                break
            start += mod.shape[0]
        cut = n - start
        for name in ("ids", "modality", "pool", "pos"):
            pieces = getattr(self, name)[:kept]
            pieces[-1] = pieces[-1][..., :cut]
            setattr(self, name, [x for x in pieces if x.shape[-1]])
        self.length = n
        self.next_pos = int(self.pos[-1].max()) + 1 if self.pos else 0

    def add_patches(self, kind: str, patches: torch.Tensor, pos: torch.Tensor, modality: int, advance: int) -> None:
        n = patches.shape[0]
        (self.vision if kind == "vision" else self.audio).append((self.length, patches))
        self.ids.append(torch.zeros(n, dtype=torch.int64))
        self.modality.append(torch.full((n,), modality, dtype=torch.int8))
        self.pool.append(torch.ones(n, dtype=torch.bool))
        self.pos.append(self.next_pos + pos)
        self.length += n
        self.next_pos += advance


# ---- the processor ------------------------------------------------------------------------------

class Processor:
    """Turns Interleaved items into ModelInputs (see the module docstring for the layout)."""

    def __init__(self, config: C.EmbedderConfig, tokenizer=None):
        self.config = config
        self._tokenizer_spec = config.tokenizer if tokenizer is None else tokenizer
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None and self._tokenizer_spec is not None:
            self._tokenizer = load_tokenizer(self._tokenizer_spec)
            vocab = self._tokenizer.vocab_size
            if vocab > self.config.vocab_size:
                raise ValueError(f"the tokenizer has {vocab} ids but the model's vocab_size is "
                                 f"{self.config.vocab_size}")
        return self._tokenizer

    def _text_ids(self, text: str) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this Embedder has no tokenizer (config.tokenizer is None): pass tokenizer= "
                             "to the Embedder to embed text")
        return tok.encode(text)

    # -- segments --
    def _fitted_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """[F, C, H, W] frames resized to the patch grid the token budget allows, then normalized."""
        cfg = self.config
        size = fit_image_size(frames.shape[2], frames.shape[3], cfg.patch_size, cfg.max_image_side,
                              cfg.max_image_tokens)
        return self._normalize(resize_frames(frames, size))

    def _add_vision(self, item: _Item, frames: torch.Tensor, kind: str, modality) -> None:
        """The <kind_start> patches <kind_end> run of an image or video (frames a multiple of the temporal patch)."""
        cfg = self.config
        patches, grid = vision_patches(frames, cfg.patch_size, cfg.temporal_patch_size)
        item.add_ids([cfg.special_token_id(f"{kind}_start")], modality)
        item.add_patches("vision", patches, vision_positions(grid), modality, max(grid))
        item.add_ids([cfg.special_token_id(f"{kind}_end")], modality)

    def _image(self, item: _Item, seg: Image) -> None:
        frames = self._fitted_frames(to_frames(seg.pixels[None]))
        # one frame repeated to fill a temporal patch: images and videos share the patch embedder
        frames = frames.expand(self.config.temporal_patch_size, *frames.shape[1:])
        self._add_vision(item, frames, "image", C.IMAGE)

    def _video(self, item: _Item, seg: Video) -> None:
        cfg = self.config
        x = seg.frames
        if x.shape[0] > cfg.max_video_frames:
            keep = torch.linspace(0, x.shape[0] - 1, cfg.max_video_frames).round().long()
            x = x[keep]
        frames = self._fitted_frames(to_frames(x))
        pad = (-frames.shape[0]) % cfg.temporal_patch_size  # the last frame repeated to a whole patch
        if pad:
            frames = torch.cat([frames, frames[-1:].expand(pad, *frames.shape[1:])], dim=0)
        self._add_vision(item, frames, "video", C.VIDEO)

    def _audio(self, item: _Item, seg: Audio) -> None:
        cfg = self.config
        wave = seg.waveform
        wave = wave.float() / 32768.0 if wave.dtype == torch.int16 else wave.float()
        if wave.dim() == 2:
            wave = wave.mean(dim=0)
        patches = audio_patches(log_mel_spectrogram(wave, seg.sample_rate, cfg.audio_mels, cfg.audio_fmax),
                                cfg.audio_frames_per_patch)
        n = patches.shape[0]
        item.add_ids([cfg.special_token_id("audio_start")], C.AUDIO)
        item.add_patches("audio", patches, torch.arange(n, dtype=torch.int64).expand(3, n), C.AUDIO, n)
        item.add_ids([cfg.special_token_id("audio_end")], C.AUDIO)

    def _normalize(self, frames: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        return (frames - mean) / std

    def item(self, inp, task: str | None = None, index: int = 0, *, truncate: bool = False) -> _Item:
        """One input's tokens (not yet packed). truncate: an input over max_seq_len loses its last
        text tokens (bos and eos are kept, as a Hugging Face tokenizer's truncation keeps [CLS] and
        [SEP]) instead of raising."""
        inter = as_interleaved(inp, index)
        item = _Item()
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        eos = getattr(tok, "eos_token_id", None)
        if bos is not None:
            item.add_ids([bos], C.TEXT)
        if task is not None:
            if not isinstance(task, str):
                raise TypeError(f"task must be a str or None, got {type(task).__name__}")
            item.add_ids(self._text_ids(self.config.task_template.format(task=task)), C.TEXT, pooled=False)
        for seg in inter:
            if isinstance(seg, Text):
                item.add_ids(self._text_ids(seg.text), C.TEXT)
            elif isinstance(seg, Image):
                self._image(item, seg)
            elif isinstance(seg, Video):
                self._video(item, seg)
            elif isinstance(seg, Audio):
                self._audio(item, seg)
            else:  # Interleaved already checks; kept for subclasses of Interleaved
                raise TypeError(f"input {index}: unknown segment type {type(seg).__name__}")
        room = self.config.max_seq_len - (eos is not None)
        if truncate and item.length > room:
            item.truncate(room, f"input {index} ({inter!r})")
        if eos is not None:
            item.add_ids([eos], C.TEXT)
        if item.length > self.config.max_seq_len:
            raise ValueError(f"input {index} ({inter!r}) has {item.length} tokens, more than max_seq_len = "
                             f"{self.config.max_seq_len}; shorten it or downscale its images / videos / audio")
        if not any(bool(p.any()) for p in item.pool):
            raise ValueError(f"input {index} ({inter!r}) has no token to pool (empty text and no special tokens)")
        return item

    def pack(self, items: list[_Item]) -> ModelInputs:
        """Pack processed items into one ModelInputs (one sequence per item)."""
        if not items:
            raise ValueError("nothing to pack: the list of inputs is empty")
        lengths = [it.length for it in items]
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        cat = lambda xs, dim=0: torch.cat([x for it in items for x in getattr(it, xs)], dim=dim)  # noqa: E731
        input_ids = cat("ids")
        batch = PackedBatch.from_lengths(lengths, position_ids=cat("pos", 1).contiguous(),
                                         modality_ids=cat("modality"), pool_mask=cat("pool"))

        def gather(kind):
            rows, idx = [], []
            for it, s in zip(items, starts):
                for off, p in getattr(it, kind):
                    rows.append(p)
                    idx.append(torch.arange(s + off, s + off + p.shape[0], dtype=torch.int64))
            if not rows:
                return None, None
            return torch.cat(rows).float(), torch.cat(idx)

        vp, vi = gather("vision")
        ap, ai = gather("audio")
        return ModelInputs(batch, input_ids, vp, vi, ap, ai)

    def __call__(self, inputs, task: str | None = None) -> ModelInputs:
        """ModelInputs for a list of inputs (each an Interleaved, a segment, a str or a list of segments)."""
        _, inputs = as_input_list(inputs)
        if not inputs:
            raise ValueError("inputs is empty: pass at least one input to embed")
        return self.pack([self.item(x, task, i) for i, x in enumerate(inputs)])
