"""embedkit.train: sampler, trainer (plain and cached steps), exact resume, fingerprints, metrics."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from embedkit import Embedder, EmbedderConfig, Image, PackedBatch
from embedkit.train import (Example, Stage, Task, TaskSampler, Trainer, evaluate_retrieval, fingerprint_inputs,
                            retrieval_metrics)

pytestmark = pytest.mark.slow  # training runs

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Embedder(EmbedderConfig.tiny(out_dim=32, mrl_dims=(8, 16, 32), **kw))


def text_examples(n=24, negatives=0):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a, b = WORDS[i % 12], WORDS[(i * 5 + 1) % 12]
        negs = tuple(f"{WORDS[(i + j + 3) % 12]} doc" for j in range(negatives))
        out.append(Example(f"{a} {b} {i}", f"doc {b} {a} {i}", negs))
    rng.shuffle(out)
    return out


def image_examples(n=8):
    g = torch.Generator().manual_seed(1)
    return [Example(f"image {i}", Image(torch.rand(8, 8, 3, generator=g)), (Image(torch.rand(4, 8, 3, generator=g)),))
            for i in range(n)]


# ---- sampler --------------------------------------------------------------------------------------

def test_sampler_single_task_batches_by_weight_and_epochs():
    a = Task("a", [Example(f"qa{i}", f"pa{i}") for i in range(10)], batch_size=4, weight=3.0)
    b = Task("b", [Example(f"qb{i}", f"pb{i}") for i in range(7)], batch_size=3, weight=1.0)
    s = TaskSampler([a, b], seed=3)
    counts = {"a": 0, "b": 0}
    seen_a = []
    for _ in range(400):
        task, exs = s.next()
        counts[task.name] += 1
        assert len(exs) == task.batch_size
        assert {ex.query[1] for ex in exs} == {task.name}  # single-task batches
        if task.name == "a" and len(seen_a) < 10:
            seen_a += [ex.query for ex in exs]
    assert 0.68 < counts["a"] / 400 < 0.82  # weight 3 : 1
    assert sorted(seen_a[:10]) == sorted(f"qa{i}" for i in range(10))  # an epoch covers every example once


def test_sampler_state_roundtrip():
    t = Task("t", [(f"q{i}", f"p{i}") for i in range(9)], batch_size=4)
    u = Task("u", [(f"x{i}", f"y{i}") for i in range(5)], batch_size=2, weight=2)
    s1 = TaskSampler([t, u], seed=1)
    for _ in range(5):
        s1.next()
    state = s1.state_dict()
    rest = [[ex.query for ex in s1.next()[1]] for _ in range(6)]
    s2 = TaskSampler([t, u], seed=99)
    s2.load_state_dict(state)
    assert [[ex.query for ex in s2.next()[1]] for _ in range(6)] == rest


def test_task_and_stage_validation():
    with pytest.raises(ValueError, match="no examples"):
        Task("x", [])
    with pytest.raises(ValueError, match="batch_size"):
        Task("x", [("a", "b")], batch_size=0)
    with pytest.raises(ValueError, match="weight"):
        Task("x", [("a", "b")], weight=0)
    with pytest.raises(ValueError, match="schedule"):
        Stage("s", [Task("x", [("a", "b")])], steps=1, schedule="step")
    with pytest.raises(ValueError, match="task_drop_prob"):
        Stage("s", [Task("x", [("a", "b")])], steps=1, task_drop_prob=2)
    with pytest.raises(TypeError, match="collate"):
        Trainer(nn.Linear(2, 2), [Stage("s", [Task("x", [("a", "b")])], steps=1)])


# ---- fingerprints / masking -------------------------------------------------------------------------

def test_fingerprint_inputs_sees_patch_content():
    m = tiny_model()
    img = torch.rand(8, 8, 3)
    x = m.processor([Image(img), Image(img.clone()), Image(torch.rand(8, 8, 3)), "a", "a", "b"])
    fp = fingerprint_inputs(x).tolist()
    assert fp[0] == fp[1] and fp[0] != fp[2]  # same token ids, different pixels: not duplicates
    assert fp[3] == fp[4] and fp[3] != fp[5]


def test_duplicates_are_masked_and_in_batch_negatives_off():
    m = tiny_model()
    tr = Trainer(m, [Stage("s", [Task("x", [("a", "b")])], steps=1)], progress=False)
    st = tr.stages[0]
    # Every target of the batch is the same text: all in-batch candidates are duplicates -> loss 0.
    exs = [Example(f"q{i}", "same doc") for i in range(4)]
    inputs, tasks, B, K = tr._batch_parts(st, st.tasks[0], exs)
    with torch.no_grad():
        emb, ids, _ = tr._embed(inputs, tasks)
    assert float(tr.loss_from_embeddings(st, st.tasks[0], emb, ids, B, K)) == 0.0
    # Distinct targets, in-batch negatives off, no hard negatives: only the positive remains -> 0.
    exs = [Example(f"q{i}", f"doc {i}") for i in range(4)]
    inputs, tasks, B, K = tr._batch_parts(st, st.tasks[0], exs)
    with torch.no_grad():
        emb, ids, _ = tr._embed(inputs, tasks)
    off = Task("off", exs, in_batch_negatives=False)
    assert float(tr.loss_from_embeddings(st, off, emb, ids, B, K)) == 0.0
    assert float(tr.loss_from_embeddings(st, st.tasks[0], emb, ids, B, K)) > 0.0


# ---- training ---------------------------------------------------------------------------------------

def _eval_loss(tr, stage, exs):
    tr.model.eval()
    with torch.no_grad():
        inputs, tasks, B, K = tr._batch_parts(stage, stage.tasks[0], exs)
        emb, ids, _ = tr._embed(inputs, tasks)
        return float(tr.loss_from_embeddings(stage, stage.tasks[0], emb, ids, B, K))


def test_training_lowers_the_loss():
    m = tiny_model()
    exs = text_examples(16)
    stage = Stage("pre", [Task("t", exs, task="match", batch_size=8)], steps=20, lr=3e-3, warmup_steps=2,
                  mrl_dims=(8, 32), temperature=0.1)
    tr = Trainer(m, [stage], progress=False, log_every=4)
    before = _eval_loss(tr, stage, exs[:8])
    hist = tr.fit()
    after = _eval_loss(tr, stage, exs[:8])
    assert after < 0.7 * before
    assert len(hist) == 5 and all(k in hist[0] for k in ("loss", "temperature", "tokens_per_s", "memory_mb"))


def test_only_log_steps_read_results_to_the_host_and_clipping_runs_every_step():
    exs = text_examples(16)
    stage = Stage("s", [Task("t", exs, batch_size=8)], steps=5, lr=3e-3, max_grad_norm=0.05, learn_temperature=True)
    runs = {}
    for every in (1, 2):
        tr = Trainer(tiny_model(4), [stage], progress=False, log_every=every)
        calls, step = [], tr.train_step

        def spy(st, *, log=True, step=step, calls=calls):
            rec = step(st, log=log)
            calls.append((log, rec))
            return rec

        tr.train_step = spy
        runs[every] = (tr, tr.fit(), calls)
    tr, hist, calls = runs[2]
    assert [log for log, _ in calls] == [False, True, False, True, True]  # every 2nd step and the last
    assert [h["step"] for h in hist] == [1, 3, 4]
    for log, rec in calls:
        if log:
            assert all(isinstance(rec[k], float) for k in ("loss", "grad_norm", "temperature", "seconds")), rec
        else:  # nothing read back: the loss and the (applied) clip norm stay device tensors
            assert isinstance(rec["loss"], torch.Tensor) and isinstance(rec["grad_norm"], torch.Tensor), rec
            assert "seconds" not in rec and "temperature" not in rec
    assert any(h["grad_norm"] > 0.05 for h in hist)  # clipping was active
    # Skipping the reads changes nothing: the same weights and logged losses as logging every step.
    every_step = runs[1]
    for (k, a), b in zip(every_step[0].model.state_dict().items(), tr.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [every_step[1][i]["loss"] for i in (1, 3, 4)] == [h["loss"] for h in hist]


def _two_stage(model, tmp=None, every=0):
    pre = Stage("pre", [Task("t", text_examples(20), task="q", batch_size=6),
                        Task("img", image_examples(8), batch_size=4, weight=0.5)],
                steps=3, lr=1e-3, task_drop_prob=0.5, mrl_dims=(8, 16, 32), mrl_weights=(0.5, 0.5, 1.0))
    fine = Stage("fine", [Task("t", text_examples(20, negatives=2), task="q", batch_size=4),
                          Task("img", image_examples(8), batch_size=4)],
                 steps=4, lr=5e-4, hard_negatives=True, num_negatives=1, learn_temperature=True,
                 temperature=0.07, chunk_size=5, warmup_steps=1)
    return Trainer(model, [pre, fine], progress=False, log_every=1, output_dir=tmp, checkpoint_every=every, seed=5)


def test_checkpoint_resume_is_exact(tmp_path):
    full = _two_stage(tiny_model(1))
    full.fit()
    # Interrupted after 5 steps (inside stage 2, with Adam moments, a learned temperature and a
    # half-consumed data order), then resumed in a fresh trainer and model.
    part = _two_stage(tiny_model(1), tmp_path, every=5)
    part.fit(max_steps=5)
    ck = tmp_path / "step-5"
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                                    "trainer.json"]
    resumed = _two_stage(tiny_model(7))
    torch.manual_seed(1234)  # clobber the RNG: the checkpoint must restore it
    resumed.load_checkpoint(ck)
    resumed.fit()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert torch.equal(full.log_temperature, resumed.log_temperature) if full.log_temperature is not None else True
    assert (tmp_path / "stage-pre" / "trainer.json").is_file()  # end-of-stage snapshot


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_step_matches_plain_step_on_embedder():
    exs = text_examples(6, negatives=1) + image_examples(4)[:2]
    stage = Stage("s", [Task("t", exs, task="q")], steps=1, hard_negatives=True, mrl_dims=(8, 32),
                  learn_temperature=True)
    out = []
    for chunk in (None, 3):
        m = tiny_model(2).double()
        tr = Trainer(m, [stage], progress=False)
        tr._start_stage(stage, 0)
        if chunk is None:
            loss, _ = tr.plain_step(stage, stage.tasks[0], exs)
        else:
            loss, _ = tr.cached_step(stage, stage.tasks[0], exs, chunk)
        out.append((float(loss), _grads(m), tr.log_temperature.grad.clone()))
    (l0, g0, t0), (l1, g1, t1) = out
    assert math.isclose(l0, l1, rel_tol=1e-9)
    assert set(g0) == set(g1) and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-7, atol=1e-10, msg=n)
    torch.testing.assert_close(t1, t0)


class BagModel(nn.Module):
    """Any module: token ids of a PackedBatch -> embeddings (mean of embeddings, dropout, linear)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        ids, batch = x
        seq = batch.seq_ids()
        h = self.drop(self.emb(ids))
        pooled = torch.zeros(batch.batch_size, 16, dtype=h.dtype).index_add_(0, seq, h)
        return self.out(pooled / batch.lengths.unsqueeze(1).to(h.dtype))


def bag_collate(inputs, tasks):
    toks = [torch.tensor(list(((t or "") + s).encode()), dtype=torch.int64) for s, t in zip(inputs, tasks)]
    return torch.cat(toks), PackedBatch.from_lengths([len(t) for t in toks])


def bag_fingerprint(x):
    from embedkit import ops

    return ops.sequence_fingerprint(x[0], x[1].cu_seqlens)


def test_cached_step_restores_dropout_rng_on_any_module():
    exs = text_examples(8)
    stage = Stage("s", [Task("t", exs)], steps=1)
    out = []
    for chunk in (None, 3):
        torch.manual_seed(0)
        m = BagModel().double()
        tr = Trainer(m, [stage], collate=bag_collate, fingerprint=bag_fingerprint, progress=False)
        tr._start_stage(stage, 0)
        torch.manual_seed(42)
        step = tr.plain_step if chunk is None else (lambda s, t, e: tr.cached_step(s, t, e, chunk))
        loss, _ = step(stage, stage.tasks[0], exs)
        out.append((float(loss), _grads(m)))
    assert math.isclose(out[0][0], out[1][0], rel_tol=1e-9)
    for n in out[0][1]:
        torch.testing.assert_close(out[1][1][n], out[0][1][n], rtol=1e-7, atol=1e-10)


# ---- evaluation -------------------------------------------------------------------------------------

def _brute_metrics(sim, rel):
    out = {"recall@1": 0, "recall@3": 0, "ndcg@10": 0, "mrr@10": 0}
    for i, r in enumerate(rel):
        order = sorted(range(sim.shape[1]), key=lambda j: -float(sim[i, j]))
        for k in (1, 3):
            out[f"recall@{k}"] += len(set(order[:k]) & set(r)) / len(r)
        gains = [1.0 if j in r else 0.0 for j in order[:10]]
        ideal = sorted([1.0] * len(r) + [0.0] * 10, reverse=True)[:10]
        dcg = lambda g: sum(x / math.log2(p + 2) for p, x in enumerate(g))  # noqa: E731
        out["ndcg@10"] += dcg(gains) / dcg(ideal)
        out["mrr@10"] += next((1 / (p + 1) for p, x in enumerate(gains) if x), 0.0)
    return {k: v / len(rel) for k, v in out.items()}


def test_retrieval_metrics_match_brute_force():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(30, 6, generator=g), torch.randn(25, 6, generator=g)
    rel = [sorted({int(x) for x in torch.randint(0, 25, (1 + i % 3,), generator=g)}) for i in range(30)]
    got = retrieval_metrics(q, c, rel, ks=(1, 3))
    sim = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T
    want = _brute_metrics(sim, rel)
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-9, abs_tol=1e-12), k
    perfect = retrieval_metrics(c[:5], c, list(range(5)))
    assert perfect == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "ndcg@10": 1.0, "mrr@10": 1.0}
    with pytest.raises(ValueError, match="relevant"):
        retrieval_metrics(q, c, rel[:3])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(q[:1], c, [[25]])


def test_evaluate_retrieval_text_to_image():
    m = tiny_model()
    imgs = [Image(torch.rand(8, 8, 3)) for _ in range(4)]
    res = evaluate_retrieval(m, ["a", "b", "c"], imgs, [0, [1, 2], 3], dim=16)
    assert set(res) == {"recall@1", "recall@5", "recall@10", "ndcg@10", "mrr@10"}
    assert res["recall@5"] == 1.0  # corpus of 4: everything is in the top 5


# ---- the demo's data ----------------------------------------------------------------------------------

def test_demo_data_is_real_and_leak_free():
    from embedkit.train import demo

    pairs = demo.code_pairs()
    assert len(pairs) > 1000
    queries = [q for _, q, _ in pairs]
    assert len(set(queries)) == len(queries)
    for _, q, target in pairs[:200]:
        assert q not in " ".join(target.split())  # the docstring is not left in the target
        assert target.startswith(("def ", "@"))
    sizes = dict(demo.SIZES["smoke"])
    tasks, evals, _ = demo.build_data(sizes)
    train_q = {ex.query for ex in tasks["code"]["examples"]}
    test_q, test_c, rel, _ = evals["code"]["test"]
    assert not train_q & set(test_q) and rel == list(range(len(test_q)))
    imgs, captions, labels, _ = evals["digits"]["test"]
    assert captions[7] == "a handwritten digit seven" and len(imgs) == len(labels) == sizes["digits_test"]
    ex = tasks["digits"]["examples"][0]
    assert isinstance(ex.query, Image) and ex.negatives[0] != ex.positive


# ---- GPU: bf16 autocast, Triton kernels --------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_bf16_step_cached_matches_plain():
    exs = text_examples(8, negatives=1) + image_examples(4)
    stage = Stage("s", [Task("t", exs, task="q")], steps=1, hard_negatives=True, learn_temperature=True)
    out = []
    for chunk in (None, 5):
        m = tiny_model(3).cuda()
        tr = Trainer(m, [stage], progress=False)
        tr._start_stage(stage, 0)
        step = tr.plain_step if chunk is None else (lambda s, t, e: tr.cached_step(s, t, e, chunk))
        loss, _ = step(stage, stage.tasks[0], exs)
        out.append((float(loss), _grads(m)))
    assert math.isfinite(out[0][0]) and abs(out[0][0] - out[1][0]) < 2e-2 * abs(out[0][0])
    for n, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][n], g, rtol=5e-2, atol=5e-3 * float(g.abs().max()) + 1e-6, msg=n)


# `embedkit demo --smoke` end to end: tests/test_progress.py (one subprocess run checks its JSON and its output).
