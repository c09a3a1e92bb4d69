"""torch.library.opcheck on every embedkit custom op (schema, fake implementation, autograd
registration, AOT dispatch), with the very arguments the public functions pass them.

The arguments are recorded, not written out: each scenario below runs public functions (forward
and backward) under a dispatch mode that records every `embedkit::` op call. Registered ops are
enumerated from torch's dispatcher after importing every module of embedkit.ops, so a new custom op
that no scenario reaches fails test_every_custom_op_is_opchecked.
"""
from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import embedkit
import embedkit.ops

CPU = torch.device("cpu")


def _registered_ops() -> set[str]:
    for mod in pkgutil.iter_modules(embedkit.ops.__path__):
        importlib.import_module(f"embedkit.ops.{mod.name}")  # lazily imported ops register too
    return {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("embedkit::")}


class _Recorder(TorchDispatchMode):
    """Records the first call of each embedkit op (its arguments detached and copied)."""

    def __init__(self, calls: dict):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("embedkit::") and name not in self.calls:
            grad = _has_autograd(name)
            self.calls[name] = (func, torch.utils._pytree.tree_map(lambda x: _copy(x, grad), (args, kwargs)))
        return func(*args, **kwargs)


def _has_autograd(name: str) -> bool:
    """Whether the op has an autograd formula: the backward ops have none (no double backward), so
    their inputs are checked without requires_grad, as autograd calls them."""
    from torch._library.custom_ops import OPDEFS

    return getattr(OPDEFS.get(name), "_backward_fn", None) is not None


def _copy(x, grad: bool):
    if not isinstance(x, torch.Tensor):
        return x
    y = x.detach().clone()
    return y.requires_grad_() if grad and x.requires_grad and y.is_floating_point() else y


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _native_ops():
    gen = torch.Generator().manual_seed(0)
    cu = _cu([3, 4])
    hidden = torch.randn(7, 5, generator=gen, requires_grad=True)
    pool_mask = torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    embedkit.masked_mean(hidden, cu, pool_mask).sum().backward()
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    padded = torch.randn(2, 4, 3, generator=gen, requires_grad=True)
    packed = embedkit.ops.pack(padded, _cu([3, 3]), mask)
    embedkit.ops.unpack(packed, _cu([3, 3]), attention_mask=mask, padding_value=-1.0).sum().backward()
    embedkit.sequence_fingerprint(torch.arange(7, dtype=torch.int32), cu)


def _triton_ops():
    gen = torch.Generator().manual_seed(1)
    cu = _cu([3, 4])
    hidden = torch.randn(7, 8, generator=gen, requires_grad=True)
    weight = torch.randn(6, 8, generator=gen, requires_grad=True)
    bias = torch.randn(6, generator=gen, requires_grad=True)
    embedkit.masked_mean(hidden, cu).sum().backward()
    embedkit.pool_project(hidden, cu, weight, bias, out_dim=4, normalize=True).sum().backward()
    query = torch.randn(4, 8, generator=gen, requires_grad=True)
    target = torch.randn(4, 8, generator=gen, requires_grad=True)
    temperature = torch.tensor(0.1, requires_grad=True)
    embedkit.nce_loss(query, target, temperature=temperature).backward()
    q = torch.randn(7, 2, 16, generator=gen, requires_grad=True)
    k = torch.randn(7, 1, 16, generator=gen, requires_grad=True)
    v = torch.randn(7, 1, 16, generator=gen, requires_grad=True)
    embedkit.varlen_attention(q, k, v, cu, 4, causal=True).sum().backward()


def _reference_ops():
    gen = torch.Generator().manual_seed(2)
    cu = _cu([3, 4])
    q = torch.randn(7, 2, 8, generator=gen, requires_grad=True)
    k = torch.randn(7, 2, 8, generator=gen, requires_grad=True)
    v = torch.randn(7, 2, 8, generator=gen, requires_grad=True)
    out, lse = embedkit.varlen_attention(q, k, v, cu, 4, return_lse=True)
    (out.sum() + lse.sum()).backward()


SCENARIOS = {"native": _native_ops, "triton": _triton_ops, "reference": _reference_ops}


def _available(backend: str) -> bool:
    return backend in [b for op in ("masked_mean", "pack", "varlen_attention")
                       for b in embedkit.available_backends(op)]


_RECORDED: dict[str, dict] = {}


def _recorded(backend: str) -> dict:
    """{op name: (op, (args, kwargs))} of one scenario, run once per session."""
    if backend not in _RECORDED:
        calls: dict = {}
        with embedkit.use_backend(backend), _Recorder(calls):
            SCENARIOS[backend]()
        _RECORDED[backend] = calls
    return _RECORDED[backend]


def test_every_custom_op_is_opchecked():
    missing = {b for b in SCENARIOS if not _available(b)}
    if missing:
        pytest.skip(f"backend(s) {sorted(missing)} unavailable here: not every op can be reached")
    reached = set().union(*(_recorded(b) for b in SCENARIOS))
    registered = _registered_ops()
    assert registered - reached == set(), "custom ops no opcheck scenario reaches (add one to SCENARIOS)"
    assert reached <= registered


@pytest.mark.parametrize("backend", list(SCENARIOS))
def test_opcheck(backend):
    if not _available(backend):
        pytest.skip(f"backend {backend!r} unavailable here")
    calls = _recorded(backend)
    assert calls, f"the {backend} scenario reached no custom op"
    for name, (op, (args, kwargs)) in sorted(calls.items()):
        try:
            torch.library.opcheck(op, args, kwargs)
        except Exception as err:
            raise AssertionError(f"opcheck of {name} ({backend}) failed: {err}") from err
