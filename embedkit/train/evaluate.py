"""Retrieval evaluation: Recall@k, nDCG@10 and MRR@10 of a query set against a corpus.

Works for any modality pair: the metrics take embeddings; `evaluate_retrieval` embeds queries and
corpus with `model.encode` (an Embedder) or with any callable mapping a list of inputs to [N, D].
Relevance is binary: `relevant[i]` is the corpus index (or the collection of indices) relevant to
query i.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch


def _relevance_lists(relevant, n_queries: int, n_corpus: int) -> list[list[int]]:
    if isinstance(relevant, torch.Tensor):
        relevant = relevant.tolist()
    rel = list(relevant)
    if len(rel) != n_queries:
        raise ValueError(f"relevant must have one entry per query ({n_queries}), got {len(rel)}")
    out = []
    for i, r in enumerate(rel):
        r = [int(r)] if isinstance(r, int) or (hasattr(r, "__index__") and not isinstance(r, Iterable)) \
            else [int(x) for x in r]
        if not r:
            raise ValueError(f"relevant[{i}] is empty: every query needs at least one relevant corpus item")
        if min(r) < 0 or max(r) >= n_corpus:
            raise ValueError(f"relevant[{i}] = {r} points outside the corpus of {n_corpus} items")
        out.append(sorted(set(r)))
    return out


def retrieval_metrics(query_emb: torch.Tensor, corpus_emb: torch.Tensor, relevant, *,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k for each k, nDCG@10 and MRR@10 (cosine similarity, binary relevance), averaged over queries."""
    if query_emb.dim() != 2 or corpus_emb.dim() != 2 or query_emb.shape[1] != corpus_emb.shape[1]:
        raise ValueError(f"query_emb [Q, D] and corpus_emb [N, D] must share D, got {tuple(query_emb.shape)} "
                         f"and {tuple(corpus_emb.shape)}")
    Q, N = query_emb.shape[0], corpus_emb.shape[0]
    if Q == 0 or N == 0:
        raise ValueError("the query set and the corpus must not be empty")
    rel = _relevance_lists(relevant, Q, N)
    q = torch.nn.functional.normalize(query_emb.float(), dim=-1)
    c = torch.nn.functional.normalize(corpus_emb.float(), dim=-1)
    depth = min(N, max(max(ks), 10))
    top = torch.cat([(q[i:i + chunk] @ c.T).topk(depth, dim=1).indices for i in range(0, Q, chunk)]).tolist()
    recall = {k: 0.0 for k in ks}
    ndcg = mrr = 0.0
    for ranked, r in zip(top, rel):
        rs = set(r)
        hits = [j in rs for j in ranked]
        for k in ks:
            recall[k] += sum(hits[:k]) / len(rs)
        dcg = sum(1.0 / math.log2(p + 2) for p, h in enumerate(hits[:10]) if h)
        idcg = sum(1.0 / math.log2(p + 2) for p in range(min(len(rs), 10)))
        ndcg += dcg / idcg
        first = next((p for p, h in enumerate(hits[:10]) if h), None)
        mrr += 0.0 if first is None else 1.0 / (first + 1)
    out = {f"recall@{k}": recall[k] / Q for k in ks}
    out["ndcg@10"] = ndcg / Q
    out["mrr@10"] = mrr / Q
    return out


def evaluate_retrieval(model, queries: Sequence, corpus: Sequence, relevant, *, query_task: str | None = None,
                       corpus_task: str | None = None, dim: int | None = None, ks: Sequence[int] = (1, 5, 10),
                       encode: Callable | None = None, **encode_kwargs) -> dict[str, float]:
    """Embeds queries and corpus (any modalities) and returns retrieval_metrics.

    model: an Embedder (its encode(inputs, task, dim) is used) or None with encode=fn(inputs, task)
    -> [N, D].
    """
    if encode is None:
        if model is None or not hasattr(model, "encode"):
            raise TypeError("model has no encode(): pass encode=fn(inputs, task) -> [N, D] embeddings")
        encode = lambda xs, task: model.encode(xs, task, dim=dim, **encode_kwargs)  # noqa: E731
    return retrieval_metrics(encode(list(queries), query_task), encode(list(corpus), corpus_task), relevant, ks=ks)
