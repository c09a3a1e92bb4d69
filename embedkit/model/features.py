"""The Processor's feature math, pure functions of tensors: image / video resizing and patching,
3-axis patch positions, and the log-mel spectrogram of audio. The layout they serve is described
in embedkit.model.processor's docstring.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fit_image_size(h: int, w: int, patch: int, max_side: int, max_tokens: int) -> tuple[int, int]:
    """(H, W), multiples of `patch`, that an h x w image is resized to (see embedkit.model.processor)."""
    scale = min(1.0, max_side / max(h, w))
    cap = max(1, max_side // patch)
    gh = min(cap, max(1, round(h * scale / patch)))
    gw = min(cap, max(1, round(w * scale / patch)))
    if gh * gw > max_tokens:
        f = math.sqrt(max_tokens / (gh * gw))
        gh, gw = max(1, math.floor(gh * f)), max(1, math.floor(gw * f))
        while gh * gw > max_tokens:  # rounding / the 1-patch floor can still leave it a little over
            if gh >= gw:
                gh -= 1
            else:
                gw -= 1
    return gh * patch, gw * patch


def to_frames(pixels: torch.Tensor) -> torch.Tensor:
    """[F, H, W, C] pixels -> float32 [F, 3, H, W] in 0..1."""
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    c = x.shape[-1]
    if c == 1:
        x = x.expand(*x.shape[:-1], 3)
    elif c == 4:
        x = x[..., :3]
    return x.permute(0, 3, 1, 2).contiguous()


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[F, C, H, W] -> [F, C, *size], bilinear and antialiased (unchanged when already that size)."""
    if tuple(frames.shape[-2:]) == size:
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)


def vision_patches(frames: torch.Tensor, patch: int, temporal: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[F, C, H, W] (F a multiple of `temporal`, H, W multiples of `patch`) -> (patches, (gt, gh, gw)).

    patches [gt*gh*gw, temporal*C*patch*patch], ordered t, h, w (row-major); each flattened as
    (frame in group, channel, row, column).
    """
    f, c, h, w = frames.shape
    gt, gh, gw = f // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh, patch, gw, patch)
    x = x.permute(0, 3, 5, 1, 2, 4, 6)
    return x.reshape(gt * gh * gw, temporal * c * patch * patch), (gt, gh, gw)


def vision_positions(grid: tuple[int, int, int]) -> torch.Tensor:
    """int64 [3, gt*gh*gw]: (t, h, w) of each patch, in vision_patches' order."""
    gt, gh, gw = grid
    t, h, w = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([t.flatten(), h.flatten(), w.flatten()]).long()


def _hz_to_mel(f):
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, sample_rate: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """[n_mels, n_freqs] triangular HTK-mel filters (peak 1) over an rfft's frequency bins."""
    freqs = torch.linspace(0.0, sample_rate / 2.0, n_freqs, dtype=torch.float64)
    m_pts = torch.linspace(float(_hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
                           float(_hz_to_mel(torch.tensor(f_max, dtype=torch.float64))), n_mels + 2,
                           dtype=torch.float64)
    f_pts = _mel_to_hz(m_pts)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0).T.float().contiguous()


def log_mel_spectrogram(waveform: torch.Tensor, sample_rate: int, n_mels: int, f_max: float) -> torch.Tensor:
    """float32 [frames, n_mels]: Whisper-style log-mel of a mono waveform (25 ms window, 10 ms hop)."""
    wave = waveform.float()
    win = max(2, round(0.025 * sample_rate))
    hop = max(1, round(0.010 * sample_rate))
    n_fft = 1 << (win - 1).bit_length()
    spec = torch.stft(wave, n_fft, hop_length=hop, win_length=win, window=torch.hann_window(win),
                      center=True, pad_mode="constant", return_complex=True)
    power = spec.abs() ** 2                                                  # [n_fft/2+1, frames]
    fb = mel_filterbank(n_fft // 2 + 1, sample_rate, n_mels, 0.0, min(f_max, sample_rate / 2.0))
    logmel = torch.clamp(fb @ power, min=1e-10).log10()
    logmel = torch.maximum(logmel, logmel.max() - 8.0)
    return ((logmel + 4.0) / 4.0).T.contiguous()


def audio_patches(logmel: torch.Tensor, frames_per_patch: int) -> torch.Tensor:
    """[frames, mels] -> [ceil(frames / k), k * mels] (padded with the spectrogram's floor value)."""
    n, mels = logmel.shape
    pad = (-n) % frames_per_patch
    if pad:
        logmel = torch.cat([logmel, logmel.min().expand(pad, mels)], dim=0)
    return logmel.reshape(-1, frames_per_patch * mels)
