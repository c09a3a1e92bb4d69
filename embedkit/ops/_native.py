"""Loader of the csrc shared libraries (the "native" backend).

Placeholder until the csrc/ libraries exist: no op has a native implementation yet, so the
native backend is unavailable everywhere and says so.
"""
from __future__ import annotations

import torch


def problem(op: str, device: torch.device) -> str | None:
    """None if the native library can run `op` on `device`, else why not."""
    return "the native (csrc) libraries are not built yet"
