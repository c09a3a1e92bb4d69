"""Settings: which backend runs the ops, and whether inputs are validated.

set_backend is process-wide. use_backend and set_validation apply to the calling thread only, so
two threads' blocks never see each other's choice. They live in a `threading.local` rather than a
`contextvars.ContextVar`: torch.compile (dynamo) cannot trace ContextVar.get (fullgraph fails,
otherwise a graph break), whereas it reads thread-local attributes and guards on them, so a compiled
function re-checks the calling thread's backend on every call and recompiles when it changed.
(Consequence: asyncio tasks sharing one thread share its use_backend / set_validation state.)
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

BACKENDS = ("auto", "triton", "native", "reference")

_backend: str | None = None  # process-wide (set_backend); None: read EMBEDKIT_BACKEND
# Per thread: .backend (use_backend's choice, absent/None: none) and .validation (absent: on).
_local = threading.local()


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The backend in force in this thread: use_backend, else set_backend, else $EMBEDKIT_BACKEND,
    else "auto"."""
    override = getattr(_local, "backend", None)
    if override is not None:
        return override
    if _backend is not None:
        return _backend
    env = os.environ.get("EMBEDKIT_BACKEND")
    if env is None or env == "":
        return "auto"
    return _check_name(env, "the environment variable EMBEDKIT_BACKEND")


def set_backend(name: str) -> None:
    """Choose the backend for every op in every thread: "auto", "triton", "native" or "reference".

    A use_backend block in force in some thread still wins there until it exits.
    """
    global _backend
    _backend = _check_name(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend `name` in this thread only, then restore this
    thread's previous choice (other threads are never affected)."""
    chosen = _check_name(name, "backend")
    previous = getattr(_local, "backend", None)
    _local.backend = chosen
    try:
        yield
    finally:
        _local.backend = previous


def set_validation(enabled: bool) -> None:
    """Switch the input checks that need a device sync (cu_seqlens contents, empty pools) on/off
    for the calling thread (every thread starts with validation on).

    Shape, dtype and device checks cost no sync and always run. `enabled` must be a bool (NumPy's
    bool accepted): a string such as "no" or "off" is truthy and would silently keep validation on.
    """
    import numpy as np

    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"set_validation(enabled) must be a bool (True or False), got "
                        f"{type(enabled).__name__} {enabled!r}")
    _local.validation = bool(enabled)


def validation_enabled() -> bool:
    """Whether this thread validates tensor contents (set_validation; on by default)."""
    return getattr(_local, "validation", True)


def _reset_for_tests() -> None:
    """Process-wide backend unset, and this thread's use_backend / validation state cleared."""
    global _backend
    _backend = None
    _local.__dict__.clear()
