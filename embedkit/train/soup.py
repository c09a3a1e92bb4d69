"""Model soups: weight averages of fine-tuned checkpoints of one architecture (Wortsman et al., 2022).

soup(checkpoints, weights=None) averages (uniformly or with weights) the floating-point tensors of
the checkpoints; greedy_soup adds checkpoints in the order of their own score and keeps each one
only if the soup's score does not drop.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .checkpoint import load_model_state


def soup(checkpoints: Sequence, weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The weighted average state dict of the checkpoints (nn.Modules, state dicts, or safetensors paths).

    weights: one per checkpoint, normalized to sum 1 (None: uniform). Floating-point tensors are
    averaged in fp32 and cast back; other tensors (integer buffers) must agree and are copied.
    """
    states = [load_model_state(c) for c in checkpoints]
    if not states:
        raise ValueError("checkpoints is empty: a soup needs at least one checkpoint")
    if weights is None:
        weights = [1.0] * len(states)
    weights = [float(w) for w in weights]
    if len(weights) != len(states):
        raise ValueError(f"weights must have one entry per checkpoint ({len(states)}), got {len(weights)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights)
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))[:5]
            raise ValueError(f"checkpoint {i} does not have the same tensors as checkpoint 0 (e.g. {diff})")
    out = {}
    for k in keys:
        ref = states[0][k]
        for i, s in enumerate(states[1:], 1):
            if s[k].shape != ref.shape:
                raise ValueError(f"tensor {k!r} has shape {tuple(s[k].shape)} in checkpoint {i} but "
                                 f"{tuple(ref.shape)} in checkpoint 0")
        if ref.is_floating_point():
            acc = torch.zeros(ref.shape, dtype=torch.float32 if ref.dtype != torch.float64 else torch.float64,
                              device=ref.device)
            for w, s in zip(weights, states):
                acc += (w / total) * s[k].to(device=ref.device, dtype=acc.dtype)
            out[k] = acc.to(ref.dtype)
        else:
            for i, s in enumerate(states[1:], 1):
                if not torch.equal(s[k].to(ref.device), ref):
                    raise ValueError(f"non-float tensor {k!r} differs between checkpoints 0 and {i}")
            out[k] = ref.clone()
    return out


def greedy_soup(checkpoints: Sequence, evaluate: Callable[[nn.Module], float], model: nn.Module
                ) -> tuple[dict[str, torch.Tensor], list[int], dict]:
    """Greedy soup: checkpoints ranked by evaluate(model with its weights) (higher is better); each is
    added to the uniform soup if the soup's score does not drop. The model ends holding the soup.

    Returns (state_dict, indices of the chosen checkpoints, {"individual": scores, "soup": score}).
    """
    states = [load_model_state(c) for c in checkpoints]
    if not states:
        raise ValueError("checkpoints is empty: a soup needs at least one checkpoint")

    def score(state):
        model.load_state_dict(state, strict=True)
        return float(evaluate(model))

    individual = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -individual[i])
    chosen, best = [order[0]], individual[order[0]]
    for i in order[1:]:
        s = score(soup([states[j] for j in chosen + [i]]))
        if s >= best:
            chosen, best = chosen + [i], s
    final = soup([states[j] for j in chosen])
    model.load_state_dict(final, strict=True)
    return final, chosen, {"individual": individual, "soup": best}
