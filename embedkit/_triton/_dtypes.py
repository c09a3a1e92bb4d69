"""Shared host-side helpers for the launchers."""
import torch

from . import INTERPRET

# Codes passed to kernels as constexpr to choose the operand dtype of tl.dot.
DOT_FP32, DOT_FP16, DOT_BF16 = 0, 1, 2


def dot_code(dtype: torch.dtype) -> int:
    """Operand dtype for tensor-core dots on inputs of `dtype` (accumulation is always fp32).

    Under the interpreter bf16 dots return wrong values (Triton 3.6 - 3.9), so bf16 operands are
    widened to fp32 there: slower, and exact to the fp32 accumulation.
    """
    if dtype == torch.float16:
        return DOT_FP16
    if dtype == torch.bfloat16:
        return DOT_FP32 if INTERPRET else DOT_BF16
    return DOT_FP32


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
