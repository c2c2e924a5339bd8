"""The compiled module `pie._ext._kernels_cuda` and what every launcher shares: loading it, turning its
error codes into exceptions, the current stream, and the checks of shapes, dtypes and devices."""

from __future__ import annotations

import torch

try:
    from pie._ext import _kernels_cuda as _C

    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # not built (no CUDA toolkit at build time) or not loadable here
    _C = None
    _IMPORT_ERROR = e

ATTN_DTYPES = {torch.float16: 1, torch.bfloat16: 2}  # the kernels' dtype codes (pie_cuda.h)
LOGIT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class CudaKernelsUnavailable(RuntimeError):
    """The CUDA kernels cannot run here (module not built, or no CUDA device)."""


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run here, or None when they can."""
    if _C is None:
        return (
            f"CUDA kernels unavailable: {_IMPORT_ERROR} (build them with a CUDA toolkit: "
            "PIE_CUDA=1 pip install . or scripts/dev_build.sh with PIE_CUDA=1)"
        )
    if not torch.cuda.is_available():
        return "CUDA kernels unavailable: no CUDA device visible to torch"
    return None


def available() -> bool:
    """True when the module is built and a CUDA device is visible."""
    return unavailable_reason() is None


def lib():
    """The compiled module; raises CudaKernelsUnavailable when it is not built."""
    if _C is None:
        raise CudaKernelsUnavailable(unavailable_reason())
    return _C


def check(code: int, op: str) -> None:
    """Raises RuntimeError naming `op` when a kernel returned a non-zero error code."""
    if code != 0:
        raise RuntimeError(f"{op}: CUDA kernel error {code}: {lib().error_string(code)}")


def stream(device: torch.device) -> int:
    """The current stream of `device`, which must be the current device (kernels launch there)."""
    current = torch.cuda.current_device()
    if device.index is not None and device.index != current:
        raise ValueError(
            f"tensors are on {device} but the current CUDA device is cuda:{current}; "
            f"call inside `with torch.cuda.device({device.index}):`"
        )
    return torch.cuda.current_stream(device).cuda_stream


def aligned16(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.data_ptr() % 16:
            raise ValueError("attention and cache tensors must start on a 16-byte boundary (vectorised access)")


def ptr(t: torch.Tensor | None) -> int:
    """t's device address, 0 for None (the kernels read 0 as "absent")."""
    return 0 if t is None else t.data_ptr()


def dtype_code(t: torch.Tensor, name: str, table: dict) -> int:
    if t.dtype not in table:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (expected one of {list(table)})")
    return table[t.dtype]


def expect(
    t: torch.Tensor,
    name: str,
    *,
    shape: tuple | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> None:
    """Checks a kernel argument: a CUDA tensor of `shape` (None entries: any size), `dtype`, `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got device {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype}, expected {dtype}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {want}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def cpu_i64(x) -> torch.Tensor:
    """A list, array or tensor of ints as a flat int64 CPU tensor."""
    return torch.as_tensor(x).to("cpu", torch.int64).reshape(-1)
