"""Loader of the csrc shared libraries (the "native" backend), and typed wrappers around them.

Where the libraries are looked for: the folder named by $EMBEDKIT_NATIVE_DIR if it is set, else
embedkit/_lib/ inside this package (where `embedkit build` and the CMake build write them by
default). libembedkit_cpu serves CPU tensors, libembedkit_cuda CUDA tensors. A missing library only
makes the native backend unavailable: `problem(op, device)` says why (this module registers it as the
"native" backend's problem callable), and an op asked explicitly for backend "native" raises with
that reason.

The wrappers check every tensor (device, dtype, shape, contiguity, int32 cu_seqlens) and raise
ValueError / TypeError *before* a pointer is handed to C; CUDA calls run on the tensors' device and
on torch's current stream. The C functions' status codes become Python errors carrying the
library's own message.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from ._dispatch import BackendUnavailableError, register_backend

NAME = "native"
ABI_VERSION = 3  # must equal EK_ABI_VERSION in csrc/include/embedkit.h
OPS = frozenset({"sequence_fingerprint", "pack", "unpack", "masked_mean"})
# The libraries that implement each op: masked_mean has no CUDA kernel (on a GPU the Triton one is
# embedkit's masked_mean; the C++ twin serves CPU tensors).
_KINDS = {"sequence_fingerprint": ("cpu", "cuda"), "pack": ("cpu", "cuda"), "unpack": ("cpu", "cuda"),
          "masked_mean": ("cpu",)}
ENV_DIR = "EMBEDKIT_NATIVE_DIR"
PACKAGE_LIB_DIR = Path(__file__).resolve().parent.parent / "_lib"

# Status codes (embedkit.h).
(EK_OK, EK_ERR_INVALID_ARGUMENT, EK_ERR_UNSUPPORTED_DTYPE, EK_ERR_BAD_CU_SEQLENS, EK_ERR_CUDA,
 EK_ERR_OUT_OF_MEMORY, EK_ERR_INTERNAL) = range(7)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CUDA_ROW_BYTES_LIMIT = 1 << 23  # pack / unpack rows of the CUDA library (8 MiB)

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
# op -> argument types of its CPU function (the CUDA one: + stream)
_SIGNATURES = {
    "sequence_fingerprint": [_P, _I64, _I64, _P, _I64, _P],
    "pack": [_P, _P, _P, _I64, _I64, _I64, _I64, _P],
    "unpack": [_P, _P, _P, _I64, _I64, _I64, _I64, _P, _P],
    "masked_mean": [_P, _I32, _I64, _I64, _I64, _P, _P, _I64, _P, _P],
}  # C name: ek_<op>_<kind>

_cache: dict[str, tuple[ctypes.CDLL | None, str | None]] = {}


def lib_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else PACKAGE_LIB_DIR


def library_path(kind: str) -> Path:
    """Path of libembedkit_<kind> ("cpu" or "cuda") in the library folder (it may not exist)."""
    return lib_dir() / f"libembedkit_{kind}.so"


def reload() -> None:
    """Look for the libraries again (after a first build, or a change of $EMBEDKIT_NATIVE_DIR).

    A library file already loaded in this process stays in use even if rebuilt in place (the
    dynamic loader keeps it by path): restart Python to run a rebuilt library."""
    _cache.clear()


def _open(kind: str) -> tuple[ctypes.CDLL | None, str | None]:
    path = library_path(kind)
    how = "build it with `embedkit build`" + ("" if kind == "cpu" else " on a machine with nvcc (CUDA toolkit)")
    if not path.exists():
        return None, f"the native {kind.upper()} library {path.name} is not in {path.parent} ({how})"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        return None, f"the native {kind.upper()} library {path} cannot be loaded: {err}"
    try:
        lib.ek_abi_version.restype = ctypes.c_int
        version = lib.ek_abi_version()
        lib.ek_error_string.restype = ctypes.c_char_p
        lib.ek_error_string.argtypes = [ctypes.c_int]
        last = getattr(lib, f"ek_{kind}_last_error")
        last.restype = ctypes.c_char_p
        last.argtypes = []
        if kind == "cpu":
            lib.ek_cpu_set_num_threads.restype = None
            lib.ek_cpu_set_num_threads.argtypes = [ctypes.c_int]
        for op, args in _SIGNATURES.items():
            if kind not in _KINDS[op]:
                continue
            fn = getattr(lib, f"ek_{op}_{kind}")
            fn.restype = ctypes.c_int
            fn.argtypes = args + ([_P] if kind == "cuda" else [])
    except AttributeError as err:
        return None, f"{path} lacks a symbol ({err}); it is stale or foreign: rebuild with `embedkit build`"
    if version != ABI_VERSION:
        return None, (f"{path} was built for ABI version {version} but this embedkit needs {ABI_VERSION}: "
                      "rebuild with `embedkit build`")
    return lib, None


def _library(kind: str) -> tuple[ctypes.CDLL | None, str | None]:
    if kind not in _cache:
        _cache[kind] = _open(kind)
    return _cache[kind]


def _kind(device: torch.device) -> str | None:
    return {"cpu": "cpu", "cuda": "cuda"}.get(device.type)


def _why_unavailable(kind: str) -> str | None:
    # A constant to torch.compile: loading (file checks, dlopen) happens outside the traced graph.
    return _library(kind)[1]


# What torch.compiler.assume_constant_result sets; the decorator itself imports torch._dynamo (~1 s) at
# `import embedkit`, so the mark is set by hand.
_why_unavailable._dynamo_marked_constant = True  # type: ignore[attr-defined]


def problem(op: str, device: torch.device) -> str | None:
    """None if the native library can run `op` on `device`, else why not."""
    if op not in OPS:
        return f"the native libraries have no {op}"
    kind = _kind(device)
    if kind is None:
        return f"the native libraries run on cpu and cuda tensors, not {device.type}"
    if kind not in _KINDS[op]:
        return f"the native {kind.upper()} library has no {op} (use backend 'triton' on {device.type} tensors)"
    return _why_unavailable(kind)


# Auto prefers it to the reference on every device it runs on (after Triton on CUDA tensors).
register_backend(NAME, problem, priority=10)


def _require(device: torch.device, op: str | None = None) -> tuple[ctypes.CDLL, str]:
    """The library for `device` (and, given `op`, one that exports it), else BackendUnavailableError."""
    kind = _kind(device)
    lib, why = _library(kind) if kind else (None, f"no native library for {device.type} tensors")
    if op is not None and kind is not None and kind not in _KINDS[op]:
        lib, why = None, problem(op, device)
    if lib is None:
        raise BackendUnavailableError(why)
    return lib, kind


# ---- argument checks (before any pointer is passed) -----------------------------------------------

def _tensor(x: object, name: str, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device} (mixed devices)")
    if _kind(x.device) is None:
        raise ValueError(f"{name} is on {x.device}; the native libraries take cpu or cuda tensors")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first), got strides {x.stride()}")
    return x


def _cu(cu_seqlens: object, device: torch.device, batch: int | None = None) -> torch.Tensor:
    cu = _tensor(cu_seqlens, "cu_seqlens", device)
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"cu_seqlens must be a non-empty 1-D int32 tensor, got {cu.dtype} of shape {tuple(cu.shape)}")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(f"cu_seqlens must have B+1 = {batch + 1} entries, got {cu.numel()}")
    return cu


def _mask(mask: object, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    m = _tensor(mask, name, device)
    if m.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"{name} must be bool or uint8 (nonzero = token), got {m.dtype}")
    if tuple(m.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(m.shape)}")
    return m


def _row_bytes(x: torch.Tensor, leading: int) -> int:
    n = 1
    for s in x.shape[leading:]:
        n *= s
    return n * x.element_size()


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None or x.numel() == 0 else x.data_ptr()


def _call(lib: ctypes.CDLL, kind: str, name: str, device: torch.device, *args) -> None:
    fn = getattr(lib, f"{name}_{kind}")
    if kind == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        if torch.cuda.current_device() == device.index:
            rc = fn(*args, stream)
        else:  # the kernels launch on the calling thread's current device
            with torch.cuda.device(device):
                rc = fn(*args, stream)
    else:
        lib.ek_cpu_set_num_threads(torch.get_num_threads())  # follow torch's intra-op setting
        rc = fn(*args)
    if rc != EK_OK:
        text = lib.ek_error_string(rc).decode()
        detail = getattr(lib, f"ek_{kind}_last_error")().decode()
        message = f"{name}_{kind} failed: {text}: {detail}"
        if rc in (EK_ERR_INVALID_ARGUMENT, EK_ERR_BAD_CU_SEQLENS):
            raise ValueError(message)
        if rc == EK_ERR_UNSUPPORTED_DTYPE:
            raise TypeError(message)
        if rc == EK_ERR_OUT_OF_MEMORY:
            raise MemoryError(message)
        raise RuntimeError(message)


# ---- typed wrappers ---------------------------------------------------------------------------------

def sequence_fingerprint(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 [B]: fingerprints of the raw bytes of the rows of values [T, ...] (see embedkit.h)."""
    values = _tensor(values, "values")
    if values.dim() < 1:
        raise ValueError("values must have a leading token dimension [T, ...], got a 0-d tensor")
    dev = values.device
    cu = _cu(cu_seqlens, dev)
    lib, kind = _require(dev, "sequence_fingerprint")
    batch = cu.numel() - 1
    out = torch.empty(batch, dtype=torch.int64, device=dev)
    _call(lib, kind, "ek_sequence_fingerprint", dev, _ptr(values), values.shape[0], _row_bytes(values, 1),
          _ptr(cu), batch, _ptr(out))
    return out


def pack(padded: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor | None,
         total_rows: int) -> torch.Tensor:
    """[total_rows, ...] tokens of padded [B, L, ...]; mask bool/uint8 [B, L] or None (right-padded)."""
    padded = _tensor(padded, "padded")
    if padded.dim() < 2:
        raise ValueError(f"padded must be [B, L, ...], got shape {tuple(padded.shape)}")
    dev = padded.device
    batch, length = padded.shape[:2]
    cu = _cu(cu_seqlens, dev, batch)
    m = _mask(mask, "attention_mask", (batch, length), dev)
    row = _row_bytes(padded, 2)
    _check_rows(row, dev)
    lib, kind = _require(dev, "pack")
    out = padded.new_empty((total_rows, *padded.shape[2:]))
    _call(lib, kind, "ek_pack", dev, _ptr(padded), _ptr(m), _ptr(cu), batch, length, row, total_rows, _ptr(out))
    return out


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor | None, padded_len: int,
           fill: torch.Tensor) -> torch.Tensor:
    """Padded [B, padded_len, ...] of packed [T, ...]; padding rows are copies of fill [...]."""
    packed = _tensor(packed, "packed")
    if packed.dim() < 1:
        raise ValueError("packed must be [T, ...], got a 0-d tensor")
    dev = packed.device
    cu = _cu(cu_seqlens, dev)
    batch = cu.numel() - 1
    m = _mask(mask, "attention_mask", (batch, padded_len), dev)
    fill = _tensor(fill, "fill", dev)
    if fill.dtype != packed.dtype or tuple(fill.shape) != tuple(packed.shape[1:]):
        raise ValueError(f"fill must be one row of packed: dtype {packed.dtype}, shape {tuple(packed.shape[1:])}; "
                         f"got {fill.dtype} {tuple(fill.shape)}")
    row = _row_bytes(packed, 1)
    _check_rows(row, dev)
    lib, kind = _require(dev, "unpack")
    out = packed.new_empty((batch, padded_len, *packed.shape[1:]))
    _call(lib, kind, "ek_unpack", dev, _ptr(packed), _ptr(m), _ptr(cu), batch, padded_len, row,
          packed.shape[0], fill.data_ptr() if row else None, _ptr(out))
    return out


def masked_mean(hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                pool_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H] in hidden's dtype, counts fp32 [B]) of hidden [T, H] fp32/fp16/bf16."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in DTYPE_CODES:
        raise TypeError(f"hidden: the native masked_mean takes float32, float16 or bfloat16, got {hidden.dtype}")
    if hidden.shape[1] > 1 and hidden.stride(1) != 1:
        raise ValueError(f"hidden must have unit column stride, got strides {hidden.stride()}")
    if hidden.shape[0] > 1 and hidden.stride(0) < hidden.shape[1]:
        raise ValueError(f"hidden's rows overlap (strides {hidden.stride()})")
    dev = hidden.device
    if _kind(dev) is None:
        raise ValueError(f"hidden is on {dev}; the native libraries take cpu or cuda tensors")
    cu = _cu(cu_seqlens, dev)
    total, width = hidden.shape
    m = _mask(pool_mask, "pool_mask", (total,), dev)
    lib, kind = _require(dev, "masked_mean")
    batch = cu.numel() - 1
    out = torch.empty(batch, width, dtype=hidden.dtype, device=dev)
    counts = torch.empty(batch, dtype=torch.float32, device=dev)
    _call(lib, kind, "ek_masked_mean", dev, _ptr(hidden), DTYPE_CODES[hidden.dtype], total, width,
          hidden.stride(0) if total > 1 else width, _ptr(cu), _ptr(m), batch, _ptr(out), _ptr(counts))
    return out, counts


def _check_rows(row_bytes: int, device: torch.device) -> None:
    if device.type == "cuda" and row_bytes > CUDA_ROW_BYTES_LIMIT:
        raise ValueError(f"rows of {row_bytes} bytes exceed the native CUDA pack/unpack limit of "
                         f"{CUDA_ROW_BYTES_LIMIT} bytes per token")
