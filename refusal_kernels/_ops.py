"""The `torch.ops.refusal` library as Python sees it.

Importing this module loads `_C`, which defines every schema (csrc/ops.cpp) and registers
the CPU (and, in a CUDA build, CUDA) kernels. Here we add what belongs in Python: fake
kernels for tracing, the autograd formula of `ablated`, and the metadata checks that the
Python backends (Triton, torch) share with the fake kernels.

Which layer checks what:
  * metadata (dtype, shape, stride, device, overlap, scale): the C++ kernels (csrc/checks.h)
    and, for fake/Triton/torch kernels, `check_*` below; both raise the same errors;
  * data (zero or non-finite direction, index out of range): the CPU kernel, where the data
    is at hand; for GPU tensors the public wrappers in `ops.py`, once per tensor version,
    so that the kernels themselves never synchronize with the host.
"""

from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (registers the schemas and the C++ kernels)

OPS = ("ablate", "ablate_indexed", "orthogonalize", "orthogonalize_norm_preserving")

# The norms orthogonalize_norm_preserving can keep: each column's or each row's.
NORM_AXES = ("column", "row")

# Device types whose dispatcher entry always has a kernel: the C++ CPU kernel, and for CUDA
# either the CUDA C++ kernels or, when the build has none, the Triton ones.
KERNEL_DEVICES = ("cpu", "cuda")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `refusal::<op>` has a kernel registered for a dispatch key such as "CUDA"."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"refusal::{op}", dispatch_key)


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_direction_dtype(t: torch.Tensor, name: str) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def _check_same_device(t: torch.Tensor, name: str, target: torch.Tensor, target_name: str) -> None:
    if t.device != target.device:
        raise ValueError(f"{name} is on {t.device} but {target_name} is on {target.device}")


def _check_writable_rows(t: torch.Tensor, name: str) -> None:
    _check_float(t, name)
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim, got a scalar")
    if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dim, got strides {tuple(t.stride())}")
    if torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(
            f"{name} has elements that overlap in memory (an expanded view?); pass a tensor that owns each element, e.g. .clone()"
        )


def _check_vector(direction: torch.Tensor, name: str, length: int, length_of: str) -> None:
    _check_direction_dtype(direction, name)
    if direction.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(direction.shape)}")
    if direction.shape[0] != length:
        raise ValueError(f"{name} has length {direction.shape[0]} but {length_of} is {length}")


def check_ablate(x: torch.Tensor, direction: torch.Tensor, scale: float) -> None:
    _check_writable_rows(x, "x")
    _check_vector(direction, "direction", x.shape[-1], "x.shape[-1]")
    _check_same_device(direction, "direction", x, "x")
    _check_scale(scale)


def index_is_per_batch_row(x: torch.Tensor, index: torch.Tensor) -> bool:
    """True when index holds one entry per batch row, broadcast over the middle dims of x."""
    return index.shape != x.shape[:-1]


def check_ablate_indexed(x: torch.Tensor, directions: torch.Tensor, index: torch.Tensor, scale: float) -> None:
    _check_writable_rows(x, "x")
    _check_direction_dtype(directions, "directions")
    if directions.dim() != 2:
        raise ValueError(f"directions must be 2-D [K, d], got shape {tuple(directions.shape)}")
    if directions.shape[1] != x.shape[-1]:
        raise ValueError(f"directions has rows of length {directions.shape[1]} but x.shape[-1] is {x.shape[-1]}")
    _check_same_device(directions, "directions", x, "x")
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")
    per_vector = index.shape == x.shape[:-1]
    per_batch_row = x.dim() >= 2 and index.dim() == 1 and index.shape[0] == x.shape[0]
    if not (per_vector or per_batch_row):
        raise ValueError(
            f"index must have shape x.shape[:-1] = {tuple(x.shape[:-1])} or x.shape[:1], got {tuple(index.shape)}"
        )
    _check_same_device(index, "index", x, "x")
    _check_scale(scale)


def check_orthogonalize(weight: torch.Tensor, direction: torch.Tensor, scale: float) -> None:
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims [d_model, d_in], got shape {tuple(weight.shape)}")
    _check_writable_rows(weight, "weight")
    _check_vector(direction, "direction", weight.shape[-2], "weight.shape[-2] (d_model)")
    _check_same_device(direction, "direction", weight, "weight")
    _check_scale(scale)


def check_orthogonalize_norm_preserving(weight: torch.Tensor, direction: torch.Tensor, scale: float, axis: str) -> None:
    check_orthogonalize(weight, direction, scale)
    if axis not in NORM_AXES:
        raise ValueError(f"axis must be 'column' or 'row', got {axis!r}")


# Fake kernels: metadata checks only, so that opcheck and torch.compile trace without data.
@torch.library.register_fake("refusal::ablate")
def _(x, direction, scale=1.0):
    check_ablate(x, direction, scale)


@torch.library.register_fake("refusal::ablate_indexed")
def _(x, directions, index, scale=1.0):
    check_ablate_indexed(x, directions, index, scale)


@torch.library.register_fake("refusal::orthogonalize")
def _(weight, direction, scale=1.0):
    check_orthogonalize(weight, direction, scale)


@torch.library.register_fake("refusal::orthogonalize_norm_preserving")
def _(weight, direction, scale=1.0, axis="column"):
    check_orthogonalize_norm_preserving(weight, direction, scale, axis)


@torch.library.register_fake("refusal::ablated")
def _(x, direction, scale=1.0):
    check_ablate(x, direction, scale)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _ablated_setup_context(ctx, inputs, output):
    _, ctx.direction, ctx.scale = inputs


def _ablated_backward(ctx, grad):
    # P = I - s d d^T is symmetric, so the vector-Jacobian product is P applied to grad.
    # The direction gets no gradient: it is a fixed probe, not a parameter.
    return torch.ops.refusal.ablated(grad, ctx.direction, ctx.scale), None, None


torch.library.register_autograd("refusal::ablated", _ablated_backward, setup_context=_ablated_setup_context)
