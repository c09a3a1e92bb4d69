"""What every kernel file of embedkit._triton shares: autotuning on a GPU only, the tl.dot operand
convention, math constants for kernels, and the launch-argument lookup of prune functions.

Autotuning: `gpu_autotune` wraps a kernel in triton.autotune on a GPU and leaves it bare under the
interpreter, where timing configs is meaningless (and slow); launches then add
`interpreter_config(...)`, the one fixed config, which is empty on a GPU (the autotuner picks).

Matrix products: `dot_dtype(dtype)` is the operand dtype for inputs of `dtype`, the accumulator is
always fp32. Every kernel with a tl.dot takes it as two constexprs from `dot_args(dtype)`: DOT_DTYPE
(what the operands are cast to: `x.to(DOT_DTYPE)`) and DOT_PREC (every tl.dot's input_precision:
exact IEEE products for fp32, never TF32, so fp32 keeps fp32 accuracy; for fp16 / bf16 operands it
does not apply). pool_project's torch GEMMs cast their operands to dot_dtype too.
"""
import torch
import triton
import triton.language as tl

from . import INTERPRET

# Triton major.minor: the spill tables of the kernel files are keyed by it (codegen differs between versions).
TRITON_VERSION = ".".join(triton.__version__.split(".")[:2])

# Constants inside kernels are constexpr globals (the only globals Triton 3.6 and 3.9 accept); on the
# host use .value.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)    # ln(2): log(x) = log2(x) * LN2


def gpu_autotune(configs, key, prune=None, reset_to_zero=None):
    """triton.autotune on a GPU (prune: its early_config_prune); under the interpreter the kernel itself,
    launched with one fixed config (interpreter_config)."""
    def wrap(fn):
        if INTERPRET:
            return fn
        return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero,
                               prune_configs_by={"early_config_prune": prune} if prune is not None else None)(fn)
    return wrap


def interpreter_config(config: dict) -> dict:
    """Launch keywords standing in for the autotuner: `config` under the interpreter, none on a GPU."""
    return dict(config) if INTERPRET else {}


def launch_arg(named_args: dict, kwargs: dict, name: str, default=None):
    """A launch argument as an early_config_prune sees it: keywords first, then the positional ones."""
    return kwargs.get(name, named_args.get(name, default))


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of the matrix products on inputs of `dtype` (accumulation always fp32): fp16 /
    bf16 as they are, anything else fp32 (exact IEEE products). Under the interpreter bf16 dots return
    wrong values (Triton 3.6 - 3.9), so bf16 operands are widened to fp32 there: slower, and exact to
    the fp32 accumulation."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not INTERPRET):
        return dtype
    return torch.float32


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_args(dtype: torch.dtype) -> dict:
    """The tl.dot constexprs (DOT_DTYPE, DOT_PREC) for inputs of `dtype` (see dot_dtype)."""
    operands = dot_dtype(dtype)
    return {"DOT_DTYPE": _TL_DTYPES[operands], "DOT_PREC": "ieee" if operands == torch.float32 else "tf32"}


@triton.jit
def dot_acc(acc, a, b, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a @ b, the operands cast to DOT_DTYPE (fp32 accumulation)."""
    acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=DOT_PREC)
    return acc


def tma_operands(ts, ndim: int, widths) -> bool:
    """Whether tensors `ts` can be loaded through device-side TMA descriptors (tl.make_tensor_descriptor),
    TMA's rules as the kernels use them: fp16 / bf16 of one element size (fp32 operands take the FMA dot,
    no HGMMA to feed), `ndim` dims, unit last stride, base address and every other stride in bytes
    multiples of 16, and each column offset in `widths` (where a kernel's boxes start inside a row) too.
    Sets the scratch allocator the descriptors need when any of them is on a GPU."""
    elem = ts[0].element_size()
    ok = all(t.dtype in (torch.float16, torch.bfloat16) and t.element_size() == elem and t.dim() == ndim
             and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
             and all((s * elem) % 16 == 0 for s in t.stride()[:-1]) for t in ts) \
        and all((w * elem) % 16 == 0 for w in widths)
    if ok and any(t.device.type == "cuda" for t in ts):
        ensure_tma_allocator()
    return ok


def _tma_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator() -> None:
    """Device-side tensor descriptors (tl.make_tensor_descriptor) need a global scratch allocator at launch
    on a GPU: set a torch one, only when none is set (a caller's own allocator is kept)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)
