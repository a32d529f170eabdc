"""Backend choice and launch helpers shared by every op (one place, as Liger-Kernel's ops/utils.py).

Backends:
- ``"triton"``: the fused kernels; on CUDA tensors, or on CPU tensors under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before this package is imported), which is how CI runs the real kernel code.
- ``"torch"``: the same mathematics in plain PyTorch; the CPU default and the reference in tests.
- ``"auto"``: ``"triton"`` on CUDA, ``"torch"`` elsewhere.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")

try:  # triton is optional on machines where it does not install (macOS, Windows)
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (read once per call; the env var is set at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to ``"torch"`` or ``"triton"`` for tensors on ``device``, or say why it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(
                "backend='triton' needs the triton package: pip install triton (Linux), or use backend='torch'"
            )
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing univ_kernels, move the tensors to CUDA, or use backend='torch'"
            )
    return backend


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Triton dtype handles for the operand dtype constexpr; resolved lazily so torch-only installs import fine.
def triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_activations(x: torch.Tensor, name: str, n_cols: int | None = None) -> None:
    """Validate one activation batch: a 2-D floating tensor [T, n] of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [tokens, neurons], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of float32, float16, bfloat16 (cast it first)")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [tokens, neurons], got shape {tuple(x.shape)}")
    if n_cols is not None and x.shape[1] != n_cols:
        raise ValueError(f"{name} has {x.shape[1]} neurons (columns) but this accumulator was built for {n_cols}")
