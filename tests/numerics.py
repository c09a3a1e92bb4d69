"""The tolerance rule of the design (flash-attn's): a kernel's max error against the high-precision
oracle must be at most `factor` (2 for values, 3 for gradients) times the max error of the same
pure-torch reference computed in the low precision, plus a small absolute slack."""
from __future__ import annotations

import torch

# Dtypes the kernel backends are held to the tolerance rule in. bf16 only on a GPU: the Triton
# interpreter converts fp32 -> bf16 by truncation (round toward zero, whatever fp_downcast_rounding
# says), so interpreted bf16 outputs carry up to 1 ulp where torch rounds to nearest (1/2 ulp).
# On CPU, bf16 gets the looser `assert_bf16_interpreted` check instead.
TRITON_DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if torch.cuda.is_available() else ())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_by_rule(name: str, actual: torch.Tensor, oracle: torch.Tensor, lowp: torch.Tensor,
                   *, factor: float = 2.0, atol: float = 1e-5) -> None:
    """|actual - oracle| <= factor * |lowp - oracle| + atol (max norms), and no NaN/inf sneaking in."""
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(oracle).all(), f"{name}: non-finite values differ"
    err = max_err(actual, oracle)
    bound = factor * max_err(lowp, oracle) + atol
    assert err <= bound, f"{name}: max error {err:.3e} exceeds {factor} x reference error + {atol:g} = {bound:.3e}"


def grads(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    """Gradients of <out, grad_out> w.r.t. inputs (None entries skipped)."""
    inputs = [x for x in inputs if x is not None]
    return torch.autograd.grad(out, inputs, grad_out.to(out.dtype), allow_unused=True)


def leaf(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy (optionally cast) that requires grad."""
    y = x.detach().to(dtype or x.dtype).clone()
    return y.requires_grad_(y.is_floating_point())


def assert_bf16_interpreted(name: str, actual: torch.Tensor, oracle: torch.Tensor, *, ulps: float = 2.0,
                            atol: float = 1e-3) -> None:
    """Interpreter bf16 check: error within `ulps` bf16 ulps (2**-7 relative) of each oracle value."""
    assert actual.dtype == torch.bfloat16, name
    err = (actual.double() - oracle.double()).abs()
    bound = ulps * 2.0 ** -7 * oracle.double().abs() + atol
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"{name}: bf16 error exceeds {ulps} ulps + {atol:g} by {worst:.3e}"
