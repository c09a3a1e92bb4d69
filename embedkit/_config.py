"""Process-wide settings: which backend runs the ops, and whether inputs are validated.

Plain module globals (not context variables) so that torch.compile can read them as constants
and guard on them; `use_backend` is therefore not thread-local.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

BACKENDS = ("auto", "triton", "native", "reference")

_backend: str | None = None  # None: not set in code, read EMBEDKIT_BACKEND
_validation: bool = True


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The backend in force: set_backend / use_backend, else $EMBEDKIT_BACKEND, else "auto"."""
    if _backend is not None:
        return _backend
    env = os.environ.get("EMBEDKIT_BACKEND")
    if env is None or env == "":
        return "auto"
    return _check_name(env, "the environment variable EMBEDKIT_BACKEND")


def set_backend(name: str) -> None:
    """Choose the backend for every op: "auto", "triton", "native" or "reference"."""
    global _backend
    _backend = _check_name(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend `name`, then restore the previous choice."""
    global _backend
    previous = _backend
    _backend = _check_name(name, "backend")
    try:
        yield
    finally:
        _backend = previous


def set_validation(enabled: bool) -> None:
    """Switch the input checks that need a device sync (cu_seqlens contents, empty pools) on/off.

    Shape, dtype and device checks cost no sync and always run.
    """
    global _validation
    _validation = bool(enabled)


def validation_enabled() -> bool:
    return _validation
