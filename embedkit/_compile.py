"""torch.compile for packed batches: one graph for every batch size and length.

A packed step's shapes are T (tokens) and B + 1 (cu_seqlens entries). With dynamic=True alone,
dynamo still specializes sizes of 1 ("0/1 specialization"): indexing with a [B] tensor guards on
B != 1 for a contiguity check, so a one-input batch (a single text, the last batch of an encode)
compiles a second graph. Tracing with backed sizes treated size-obliviously (the same graph holds
for a size of 1) keeps it at one; the patch is scoped to the compiled call, not set globally.
"""
from __future__ import annotations

import functools

import torch

# The defaults a packed forward needs: a graph break or a per-shape graph is a bug, not a fallback.
PACKED_DEFAULTS = {"fullgraph": True, "dynamic": True}


def size_oblivious(compiled):
    """Wrap a torch.compile'd callable so that its tracing (first call, any recompile) treats
    backed sizes size-obliviously (no specialization of sizes equal to 1)."""
    from torch.fx.experimental import _config as fx_config

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with fx_config.patch(backed_size_oblivious=True):
            return compiled(*args, **kwargs)

    call._embedkit_compiled = compiled
    return call


def compile_packed(fn, options: dict | None = None):
    """torch.compile(fn, fullgraph=True, dynamic=True, **options) that also compiles one graph for
    one-input batches (see size_oblivious). options: torch.compile's keywords (backend, mode, ...)."""
    opts = {**PACKED_DEFAULTS, **(options or {})}
    return size_oblivious(torch.compile(fn, **opts))
