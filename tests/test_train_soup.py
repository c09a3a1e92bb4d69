"""Model soups: averaging math, checkpoint paths, and the in-domain / out-of-domain trade-off."""
import pytest
import torch
from torch import nn

from embedkit import PackedBatch, ops
from embedkit.train import Example, Stage, Task, Trainer, greedy_soup, retrieval_metrics, soup

pytestmark = pytest.mark.slow  # training runs

N = 24  # queries per domain


class LookupEncoder(nn.Module):
    """A small model: string -> id -> embedding -> MLP. Input: (ids [B], PackedBatch of length-1 seqs)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(len(vocab), 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))

    def forward(self, x):
        return self.mlp(self.emb(x[0]))

    def encode(self, items):
        with torch.no_grad():
            return self(self.collate(items, [None] * len(items)))

    def collate(self, items, tasks):
        ids = torch.tensor([self.vocab[s] for s in items])
        return ids, PackedBatch.from_lengths([1] * len(items))


def fp(x):
    return ops.sequence_fingerprint(x[0], x[1].cu_seqlens)


def domains():
    # The same queries, two different relevance maps: learning one (in-domain) forgets the other.
    ood = [Example(f"q{i}", f"v{i}") for i in range(N)]
    ind = [Example(f"q{i}", f"w{(i * 7 + 3) % N}") for i in range(N)]
    vocab = {s: i for i, s in enumerate([f"q{i}" for i in range(N)] + [f"v{i}" for i in range(N)]
                                        + [f"w{i}" for i in range(N)])}
    return ind, ood, vocab


def score(model, examples):
    q = model.encode([e.query for e in examples])
    corpus = sorted({e.positive for e in examples})
    c = model.encode(corpus)
    return retrieval_metrics(q, c, [corpus.index(e.positive) for e in examples])["mrr@10"]


def train(model, examples, steps, lr):
    st = Stage("s", [Task("t", examples, batch_size=12)], steps=steps, lr=lr, weight_decay=0.0, schedule="constant",
               temperature=0.1)
    Trainer(model, [st], collate=model.collate, fingerprint=fp, progress=False, log_every=0).fit()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_soup_recovers_out_of_domain_while_keeping_in_domain_gains():
    ind, ood, vocab = domains()
    torch.manual_seed(0)
    model = LookupEncoder(vocab)
    base = train(model, ood, 120, 3e-2)        # the "pre-trained" model: good out of domain
    tuned = train(model, ind, 120, 3e-2)       # fine-tuned in domain: forgets the other domain
    scores = {}
    for name, state in (("base", base), ("tuned", tuned), ("soup", soup([base, tuned]))):
        model.load_state_dict(state)
        scores[name] = (score(model, ind), score(model, ood))
    (b_in, b_out), (t_in, t_out), (s_in, s_out) = scores["base"], scores["tuned"], scores["soup"]
    assert t_in > b_in + 0.3 and b_out > t_out + 0.3, scores   # the trade-off exists
    assert s_in > b_in + 0.2 and s_out > t_out + 0.2, scores   # the soup recovers most of both
    # Greedy soup on the mean of both domains keeps both ingredients and beats each of them.
    mean = lambda m: 0.5 * (score(m, ind) + score(m, ood))  # noqa: E731
    state, chosen, info = greedy_soup([tuned, base], mean, model)
    assert sorted(chosen) == [0, 1] and info["soup"] > max(info["individual"]), info
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_soup_weighted_average_and_inputs(tmp_path):
    torch.manual_seed(0)
    a, b, c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
    s = soup([a, b.state_dict(), c], weights=[1, 2, 1])
    torch.testing.assert_close(s["weight"], (a.weight + 2 * b.weight + c.weight).detach() / 4)
    u = soup([a, b])
    torch.testing.assert_close(u["bias"], (a.bias + b.bias).detach() / 2)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "a.safetensors"))
    (tmp_path / "d").mkdir()
    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, str(tmp_path / "d" / "model.safetensors"))
    torch.testing.assert_close(soup([tmp_path / "a.safetensors", str(tmp_path / "d")])["weight"], u["weight"])
    with pytest.raises(ValueError, match="weights"):
        soup([a, b], weights=[1])
    with pytest.raises(ValueError, match="same tensors"):
        soup([a, nn.Linear(3, 2, bias=False)])
    with pytest.raises(ValueError, match="shape"):
        soup([a, nn.Linear(4, 2)])
    with pytest.raises(FileNotFoundError):
        soup([tmp_path / "missing"])
