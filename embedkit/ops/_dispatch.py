"""Backend resolution: which implementation of an op runs on which tensors.

Each op module registers the backends it implements with `register_op`. `resolve(op, device)`
turns the configured backend (set_backend / use_backend / $EMBEDKIT_BACKEND) into a concrete one
for the tensors' device. A backend named explicitly never falls back: if it cannot run the op on
this device it raises BackendUnavailableError saying why. Only "auto" chooses.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .. import _config

_OPS: dict[str, frozenset[str]] = {}


class BackendUnavailableError(RuntimeError):
    """The backend that was asked for cannot run this op on these tensors."""


def register_op(op: str, backends: set[str] | frozenset[str]) -> None:
    """Declare which backends (besides "reference", always present) implement `op`."""
    _OPS[op] = frozenset(backends) | {"reference"}


def _triton_problem(device: torch.device) -> str | None:
    """None if Triton kernels can run on tensors of `device`, else the reason they cannot."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        import embedkit._triton as triton_kernels

        if triton_kernels.INTERPRET:
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after embedkit._triton was imported; set it before "
                    "importing embedkit to run Triton kernels on CPU tensors")
        return ("Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "importing embedkit (slow, for testing), or use backend 'native' or 'reference'")
    return f"Triton kernels do not run on {device.type} tensors"


def _native_problem(op: str, device: torch.device) -> str | None:
    from . import _native

    return _native.problem(op, device)


def _problem(op: str, backend: str, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend not in _OPS[op]:
        return f"embedkit has no {backend!r} implementation of {op}"
    if backend == "triton":
        return _triton_problem(device)
    if backend == "native":
        return _native_problem(op, device)
    raise AssertionError(backend)


def resolve(op: str, device: torch.device) -> str:
    """The concrete backend ("triton", "native" or "reference") that runs `op` on `device`."""
    name = _config.get_backend()
    if name == "auto":
        order: tuple[str, ...]
        if device.type == "cuda":
            order = ("triton", "native", "reference")
        else:  # the interpreter is a correctness tool, never the fast path on CPU
            order = ("native", "reference")
        for candidate in order:
            if _problem(op, candidate, device) is None:
                return candidate
        return "reference"
    problem = _problem(op, name, device)
    if problem is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run {op} on {device.type} tensors: {problem}")
    return name


def available_backends(op: str) -> list[str]:
    """Backends that can run `op` on this machine (on CUDA tensors if a GPU is present, else CPU)."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
    found = []
    for backend in ("triton", "native", "reference"):
        if any(_problem(op, backend, d) is None for d in devices):
            found.append(backend)
    return found


def registered_ops() -> list[str]:
    return sorted(_OPS)
