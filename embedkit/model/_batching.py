"""Token-budget batching, shared by Embedder.encode and the sentence-transformers integration.

Inputs are sorted longest first and cut into consecutive groups of at most `max_tokens` tokens, so
one step holds sequences of similar length (its max_seqlen, and so the attention kernel's grid, is
not set by one long outlier among short ones). Callers write each group's embeddings back at its
input indices: results come out in input order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def token_budget_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Input indices, longest first, cut into consecutive groups of at most max_tokens tokens
    (a longer input forms a group of its own). Ties keep input order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches, start, used = [], 0, 0
    for i, n in enumerate(lengths[order].tolist()):
        if used and used + n > max_tokens:
            batches.append(order[start:i])
            start, used = i, 0
        used += n
    batches.append(order[start:])
    return batches


def windowed_batches(items: Iterable[T], length: Callable[[T], int], max_tokens: int,
                     window_tokens: int) -> Iterator[tuple[np.ndarray, list[T]]]:
    """(input indices, items) of each token-budget batch of a stream of items.

    The stream is read in windows of about `window_tokens` tokens (a window closes on the item that
    reaches it), and each window is batched by token_budget_batches: only one window of items is
    held at a time (Embedder.encode's items carry their image / audio patches, far larger than the
    inputs), at the price of sorting within a window rather than over all inputs.
    """
    def batches(window: list[T], lengths: list[int], base: int):
        for sel in token_budget_batches(np.asarray(lengths), max_tokens):
            yield base + sel, [window[i] for i in sel.tolist()]

    window: list[T] = []
    lengths: list[int] = []
    base = used = 0
    for item in items:
        window.append(item)
        lengths.append(int(length(item)))
        used += lengths[-1]
        if used >= window_tokens:
            yield from batches(window, lengths, base)
            base += len(window)
            window, lengths, used = [], [], 0
    if window:
        yield from batches(window, lengths, base)
