"""Backend resolution: which implementation of an op runs on which tensors.

Two registries. Each backend registers itself with `register_backend`: its name, a
`problem(op, device)` callable (None if it can run `op` on tensors of `device`, else why not) and its
place in the "auto" order (a priority, and the device types auto may pick it for). Each op module
declares the backends it implements with `register_op`. `resolve(op, device)` turns the configured
backend (set_backend / use_backend / $EMBEDKIT_BACKEND) into a concrete one for the tensors' device.
A backend named explicitly never falls back: if it cannot run the op on this device it raises
BackendUnavailableError saying why. Only "auto" chooses.

This module imports no backend: the backends import it to register (the reference backend, always
present, is registered here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .. import _config

Problem = Callable[[str, torch.device], "str | None"]


class BackendUnavailableError(RuntimeError):
    """The backend that was asked for cannot run this op on these tensors."""


@dataclass(frozen=True)
class Backend:
    name: str
    problem: Problem
    priority: int  # auto tries the higher first
    auto_devices: frozenset[str] | None  # device types auto may pick it for (None: every type)


_BACKENDS: dict[str, Backend] = {}
_OPS: dict[str, frozenset[str]] = {}


def register_backend(name: str, problem: Problem, *, priority: int,
                     auto_devices: Iterable[str] | None = None) -> None:
    """Make backend `name` known to the dispatcher (re-registering replaces it)."""
    if name not in _config.BACKENDS or name == "auto":
        raise ValueError(f"backend names are those of embedkit.set_backend {_config.BACKENDS[1:]}, got {name!r}")
    _BACKENDS[name] = Backend(name, problem, priority, None if auto_devices is None else frozenset(auto_devices))


def register_op(op: str, backends: set[str] | frozenset[str]) -> None:
    """Declare which backends (besides "reference", always present) implement `op`."""
    _OPS[op] = frozenset(backends) | {"reference"}


register_backend("reference", lambda op, device: None, priority=0)


def _by_priority() -> list[Backend]:
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def _problem(op: str, backend: str, device: torch.device) -> str | None:
    if backend not in _OPS.get(op, frozenset({"reference"})):
        return f"embedkit has no {backend!r} implementation of {op}"
    registered = _BACKENDS.get(backend)
    if registered is None:  # declared by an op, but its module was never imported
        return f"the {backend!r} backend is not registered"
    return registered.problem(op, device)


def resolve(op: str, device: torch.device) -> str:
    """The concrete backend (a registered name, e.g. "triton", "native", "reference") that runs `op`
    on `device`."""
    name = _config.get_backend()
    if name == "auto":
        for candidate in _by_priority():
            if candidate.auto_devices is not None and device.type not in candidate.auto_devices:
                continue
            if _problem(op, candidate.name, device) is None:
                return candidate.name
        return "reference"
    problem = _problem(op, name, device)
    if problem is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run {op} on {device.type} tensors: {problem}")
    return name


def available_backends(op: str) -> list[str]:
    """Backends that can run `op` on this machine (on CUDA tensors if a GPU is present, else CPU),
    in auto's order of preference."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
    return [b.name for b in _by_priority() if any(_problem(op, b.name, d) is None for d in devices)]


def registered_ops() -> list[str]:
    return sorted(_OPS)


def registered_backends() -> list[str]:
    """Names of the registered backends, in auto's order of preference."""
    return [b.name for b in _by_priority()]
