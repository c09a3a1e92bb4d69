"""The Processor: token counts, patch layouts, 3-axis positions, modality ids, pool masks, limits and
input errors, for every modality and for mixes."""
import math

import numpy as np
import pytest
import torch

import embedkit
from embedkit.model import AUDIO, IMAGE, TEXT, VIDEO, EmbedderConfig, Processor
from embedkit.model.processor import fit_image_size, log_mel_spectrogram, mel_filterbank

CFG = EmbedderConfig.tiny()  # bytes tokenizer, patch 4, temporal patch 2, 16 mels, 4 frames per patch
BOS, EOS = 257, 258


@pytest.fixture(scope="module")
def proc():
    return Processor(CFG)


def sid(name):
    return CFG.special_token_id(name)


def test_text_tokens_positions_and_pool_mask(proc):
    inp = proc([embedkit.Text("héllo"), "ab"], task="find")
    b = inp.batch
    assert b.batch_size == 2
    body = list("héllo".encode())
    task = list(CFG.task_template.format(task="find").encode())
    assert inp.input_ids[: b.cu_seqlens[1]].tolist() == [BOS] + task + body + [EOS]
    n0 = 2 + len(task) + len(body)
    assert b.cu_seqlens.tolist() == [0, n0, n0 + 2 + len(task) + 2]
    # Text positions are 1-D (all axes equal), restarting at 0 in every sequence.
    assert b.position_ids.shape == (3, b.total_tokens)
    assert torch.equal(b.position_ids[0], b.position_ids[1]) and torch.equal(b.position_ids[0], b.position_ids[2])
    assert b.position_ids[0, :n0].tolist() == list(range(n0))
    assert b.position_ids[0, n0:].tolist() == list(range(b.total_tokens - n0))
    # Task tokens are attended to but not pooled; bos / text / eos are pooled.
    pm = b.pool_mask[:n0].tolist()
    assert pm == [True] + [False] * len(task) + [True] * (len(body) + 1)
    assert (b.modality_ids == TEXT).all()
    assert inp.vision_patches is None and inp.audio_patches is None


def test_image_patches_positions(proc):
    img = torch.rand(8, 12, 3)  # already a multiple of the patch size 4: no resize
    inp = proc(embedkit.Image(img))
    b = inp.batch
    gh, gw = 2, 3
    assert b.total_tokens == 1 + 1 + gh * gw + 1 + 1
    ids = inp.input_ids.tolist()
    assert ids[0] == BOS and ids[1] == sid("image_start") and ids[-2] == sid("image_end") and ids[-1] == EOS
    assert inp.vision_index.tolist() == list(range(2, 2 + gh * gw))
    assert inp.vision_patches.shape == (gh * gw, CFG.vision_patch_dim)
    # Patch (h, w) holds pixels [4h:4h+4, 4w:4w+4], normalized, repeated over the temporal patch.
    norm = (img - 0.5) / 0.5
    for h in range(gh):
        for w in range(gw):
            p = inp.vision_patches[h * gw + w].view(2, 3, 4, 4)
            expect = norm[4 * h:4 * h + 4, 4 * w:4 * w + 4].permute(2, 0, 1)
            torch.testing.assert_close(p[0], expect)
            torch.testing.assert_close(p[1], expect)
    # Positions: (p, p + h, p + w) with p = 2 after bos and image_start; then p advances by max(grid) = 3.
    pos = b.position_ids[:, 2:2 + gh * gw]
    assert pos[0].tolist() == [2] * 6
    assert pos[1].tolist() == [2, 2, 2, 3, 3, 3]
    assert pos[2].tolist() == [2, 3, 4, 2, 3, 4]
    assert b.position_ids[:, -2].tolist() == [5, 5, 5] and b.position_ids[:, -1].tolist() == [6, 6, 6]
    assert b.modality_ids.tolist() == [TEXT] + [IMAGE] * (gh * gw + 2) + [TEXT]


def test_image_uint8_grey_rgba_and_numpy(proc):
    arr = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a = proc(embedkit.Image(arr)).vision_patches
    b = proc(embedkit.Image(torch.from_numpy(arr).float() / 255)).vision_patches
    torch.testing.assert_close(a, b)
    rgba = np.concatenate([arr, np.full((8, 8, 1), 7, np.uint8)], axis=-1)
    torch.testing.assert_close(proc(embedkit.Image(rgba)).vision_patches, a)
    grey = arr[..., :1]
    g = proc(embedkit.Image(grey)).vision_patches.view(-1, 2, 3, 16)
    assert torch.equal(g[:, :, 0], g[:, :, 1]) and torch.equal(g[:, :, 0], g[:, :, 2])


@pytest.mark.parametrize("h,w,expect", [
    (8, 12, (8, 12)),          # already fits
    (9, 14, (8, 16)),          # nearest multiple of the patch size
    (2, 3, (4, 4)),            # at least one patch per side
    (128, 32, (64, 16)),       # longer side downscaled to max_image_side = 64
    (64, 64, (32, 32)),        # 256 patches > max_image_tokens = 64: downscaled to fit
])
def test_image_resize_policy(h, w, expect):
    assert fit_image_size(h, w, CFG.patch_size, CFG.max_image_side, CFG.max_image_tokens) == expect


def test_image_downscaled_token_count(proc):
    inp = proc(embedkit.Image(torch.rand(200, 100, 3)))
    gh, gw = 64 // 4, 32 // 4  # side limit 64 -> 64 x 32 -> 128 patches > 64 -> scaled by 1/sqrt(2)
    n = inp.vision_patches.shape[0]
    assert n <= CFG.max_image_tokens and n > 0
    assert n == math.floor(gh / math.sqrt(2)) * math.floor(gw / math.sqrt(2))


def test_video_temporal_grouping_and_positions(proc):
    frames = torch.rand(3, 8, 8, 3)  # 3 frames -> padded to 4 -> 2 temporal groups
    inp = proc(embedkit.Video(frames))
    gt, gh, gw = 2, 2, 2
    assert inp.vision_patches.shape == (gt * gh * gw, CFG.vision_patch_dim)
    p = inp.vision_patches.view(gt, gh, gw, 2, 3, 4, 4)
    norm = ((frames - 0.5) / 0.5).permute(0, 3, 1, 2)
    torch.testing.assert_close(p[0, 1, 0, 1], norm[1, :, 4:8, 0:4])
    torch.testing.assert_close(p[1, 0, 1, 0], norm[2, :, 0:4, 4:8])
    torch.testing.assert_close(p[1, 0, 1, 1], norm[2, :, 0:4, 4:8])  # last frame repeated
    pos = inp.batch.position_ids[:, inp.vision_index]
    t, h, w = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
    assert torch.equal(pos, 2 + torch.stack([t.flatten(), h.flatten(), w.flatten()]))
    assert set(inp.batch.modality_ids[1:-1].tolist()) == {VIDEO}
    assert inp.input_ids[1] == sid("video_start") and inp.input_ids[-2] == sid("video_end")


def test_video_frames_subsampled():
    cfg = EmbedderConfig.tiny(max_video_frames=4)
    inp = Processor(cfg)(embedkit.Video(torch.rand(10, 4, 4, 3)))
    assert inp.vision_patches.shape[0] == 4 // cfg.temporal_patch_size


def test_audio_patches_positions(proc):
    sr = 16000
    wave = torch.randn(sr // 2)  # 0.5 s -> 51 frames of 10 ms -> 13 patches of 4 frames
    inp = proc(embedkit.Audio(wave, sr))
    n = inp.audio_patches.shape[0]
    assert n == math.ceil((1 + len(wave) // 160) / CFG.audio_frames_per_patch)
    assert inp.audio_patches.shape[1] == CFG.audio_patch_dim
    assert inp.input_ids[1] == sid("audio_start") and inp.input_ids[-2] == sid("audio_end")
    pos = inp.batch.position_ids[:, inp.audio_index]
    assert torch.equal(pos, (2 + torch.arange(n)).expand(3, n))
    assert (inp.batch.modality_ids[1:-1] == AUDIO).all()


def test_audio_int16_stereo_and_sample_rate_independence(proc):
    sr = 8000
    t = torch.arange(sr) / sr
    tone = 0.5 * torch.sin(2 * math.pi * 440 * t)
    a = proc(embedkit.Audio(tone, sr)).audio_patches
    b = proc(embedkit.Audio(torch.stack([tone, tone]), sr)).audio_patches
    torch.testing.assert_close(a, b)
    c = proc(embedkit.Audio((tone * 32768).round().to(torch.int16), sr)).audio_patches
    torch.testing.assert_close(a, c, atol=2e-2, rtol=0)
    # Window and hop are set in seconds: 0.25 s gives the same frame count at 8 kHz and 16 kHz.
    n8 = log_mel_spectrogram(torch.randn(2000), 8000, 16, 4000.0).shape[0]
    n16 = log_mel_spectrogram(torch.randn(4000), 16000, 16, 4000.0).shape[0]
    assert n8 == n16 == 26


def test_log_mel_puts_a_tone_in_its_band():
    sr, f = 16000, 1000.0
    t = torch.arange(sr) / sr
    mel = log_mel_spectrogram(torch.sin(2 * math.pi * f * t), sr, 40, 8000.0)
    fb = mel_filterbank(257, sr, 40, 0.0, 8000.0)
    assert fb.shape == (40, 257) and (fb >= 0).all() and fb.max() <= 1.0 + 1e-6
    band = int(fb[:, round(f / (sr / 2) * 256)].argmax())
    assert int(mel[10:-10].mean(0).argmax()) == band


def test_mixed_items_pack_in_order(proc):
    items = [
        embedkit.Interleaved(["a photo of", embedkit.Image(torch.rand(4, 8, 3)), "and a clip",
                              embedkit.Audio(torch.randn(1600), 16000)]),
        embedkit.Interleaved([embedkit.Video(torch.rand(2, 4, 4, 3)), embedkit.Text("x")]),
        "just text",
    ]
    inp = proc(items)
    b = inp.batch
    assert b.batch_size == 3
    lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
    n_img, n_aud = 2, math.ceil(11 / 4)
    assert lengths[0] == 2 + len("a photo of") + (n_img + 2) + len("and a clip") + (n_aud + 2)
    assert lengths[1] == 2 + (1 + 2) + 1
    assert lengths[2] == 2 + len("just text")
    # Patch rows point at tokens of the right modality, in the right sequences.
    assert (b.modality_ids[inp.vision_index[:n_img]] == IMAGE).all()
    assert (b.modality_ids[inp.vision_index[n_img:]] == VIDEO).all()
    assert (b.modality_ids[inp.audio_index] == AUDIO).all()
    seq = b.seq_ids()
    assert seq[inp.vision_index].tolist() == [0, 0, 1]
    assert (seq[inp.audio_index] == 0).all()
    # Positions within item 0 keep increasing across segments (text after the image starts after it).
    start = 1 + len("a photo of")
    assert b.position_ids[0, start].item() == start  # image_start
    after_img = start + 1 + n_img + 1
    assert b.position_ids[0, after_img].item() == start + 1 + 2 + 1  # p advanced by max(grid) = 2
    assert b.pool_mask.all()


def test_single_inputs_and_lists(proc):
    assert proc("hi").batch.batch_size == 1
    assert proc([[embedkit.Text("a"), "b"]]).batch.batch_size == 1
    assert proc(embedkit.Image(torch.rand(4, 4, 3))).batch.batch_size == 1


# ---- errors --------------------------------------------------------------------------------------

def test_empty_interleaved():
    with pytest.raises(ValueError, match="at least one segment"):
        embedkit.Interleaved([])


def test_unknown_segment_type():
    with pytest.raises(TypeError, match="segment 1 .*unknown type int"):
        embedkit.Interleaved([embedkit.Text("a"), 3])
    with pytest.raises(TypeError, match="input 0"):
        Processor(CFG)([object()])


@pytest.mark.parametrize("pixels,exc,msg", [
    (np.zeros((4, 4, 3), dtype=np.int32), TypeError, "uint8 .* or float"),
    (torch.zeros(4, 4, 3, dtype=torch.bool), TypeError, "uint8 .* or float"),
    (np.array([["a"]]), TypeError, "numbers"),
    ([[1, 2]], TypeError, "NumPy array or a torch tensor"),
    (torch.zeros(4, 4), ValueError, r"rank 3"),
    (torch.zeros(1, 4, 4, 3), ValueError, r"rank 3"),
    (torch.zeros(4, 4, 2), ValueError, "channels"),
    (torch.zeros(0, 4, 3), ValueError, "empty"),
])
def test_bad_images(pixels, exc, msg):
    with pytest.raises(exc, match=msg):
        embedkit.Image(pixels)


def test_bad_video_and_audio():
    with pytest.raises(ValueError, match="rank 4"):
        embedkit.Video(torch.zeros(4, 4, 3))
    with pytest.raises(ValueError, match="length 0"):
        embedkit.Audio(torch.zeros(0), 16000)
    with pytest.raises(ValueError, match="length 0"):
        embedkit.Audio(np.zeros((2, 0), dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        embedkit.Audio(torch.zeros(10), 0)
    with pytest.raises(TypeError, match="int16 or float"):
        embedkit.Audio(torch.zeros(10, dtype=torch.int64), 16000)
    with pytest.raises(TypeError, match="Text takes a str"):
        embedkit.Text(b"bytes")


def test_too_many_tokens_is_a_clear_error():
    proc = Processor(EmbedderConfig.tiny(max_seq_len=16))
    with pytest.raises(ValueError, match="input 1 .* more than max_seq_len = 16"):
        proc(["short", "x" * 40])


def test_empty_input_list(proc):
    with pytest.raises(ValueError, match="empty"):
        proc([])


def test_processor_reexports_what_moved_out_of_it():
    """The tokenizers, the feature math and ModelInputs have files of their own; the names stay
    importable from embedkit.model.processor, as the same objects."""
    from embedkit.model import features, inputs, processor, tokenizers

    for name in ("ByteTokenizer", "HFTokenizer", "load_tokenizer"):
        assert getattr(processor, name) is getattr(tokenizers, name)
    for name in ("fit_image_size", "vision_patches", "vision_positions", "mel_filterbank", "log_mel_spectrogram",
                 "audio_patches"):
        assert getattr(processor, name) is getattr(features, name)
    assert processor.ModelInputs is inputs.ModelInputs is embedkit.ModelInputs
