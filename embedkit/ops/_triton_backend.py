"""The "triton" backend's registration: the Triton kernels of embedkit._triton.

Auto picks it first on CUDA tensors and never on CPU tensors: there the kernels run only under the
interpreter (TRITON_INTERPRET=1), a correctness tool, never the fast path; asked for by name, it runs.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import _dispatch

NAME = "triton"


def problem(op: str, device: torch.device) -> str | None:
    """None if Triton kernels can run on tensors of `device`, else the reason they cannot."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        # Imported here, not at module level: importing triton costs seconds, and only a CPU
        # dispatch needs to know whether the kernels were decorated under the interpreter.
        import embedkit._triton as triton_kernels

        if triton_kernels.INTERPRET:
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after embedkit._triton was imported; set it before "
                    "importing embedkit to run Triton kernels on CPU tensors")
        return ("Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "importing embedkit (slow, for testing), or use backend 'native' or 'reference'")
    return f"Triton kernels do not run on {device.type} tensors"


_dispatch.register_backend(NAME, problem, priority=20, auto_devices={"cuda"})
