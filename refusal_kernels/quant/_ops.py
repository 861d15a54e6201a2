"""Metadata checks and fake kernels of the `refusal::orthogonalize_<format>` ops.

The checks mirror csrc/quant_checks.h (same errors, same messages): they read shapes,
dtypes and devices only, and every one of them runs before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import backends
from .._ops import _check_float, _check_same_device, _check_scale, _check_vector, has_kernel
from ..ops import _check_data_once, _nonzero_finite_rows

FP8_BLOCK = 128
TRITON_FORMATS = ("int8", "gptq", "fp8")
# GPTQ's qzeros hold z - zero_min: "v1" stores zero points minus 1, "v2" stores them as is.
GPTQ_ZEROS_FORMATS = {"v1": 1, "v2": 0}


def run(fmt: str, reference_: Callable, direction: torch.Tensor, *args) -> None:
    """refusal::orthogonalize_<fmt>(*args) on the backend of the storage's device (args[0]).

    CPU storage runs the C++ kernel, which checks the direction's data itself. CUDA storage
    runs the CUDA kernel when built (and chosen), else the Triton kernel for the formats that
    have one, else `reference_(*args)`; the direction is checked here, once per version.
    """
    op = getattr(torch.ops.refusal, f"orthogonalize_{fmt}")
    target = args[0]
    _check_data_once(direction, "direction", _nonzero_finite_rows, target)
    # Meta tensors reach the fake kernel through the dispatcher.
    backend = "dispatcher" if target.device.type in ("cpu", "meta") else backends.get_backend()
    if backend == "dispatcher" or (backend == "cuda" and has_kernel(f"orthogonalize_{fmt}", "CUDA")):
        op(*args)
    elif backend in ("cuda", "triton") and fmt in TRITON_FORMATS:
        from ..backends.triton import quant

        getattr(quant, f"orthogonalize_{fmt}_")(*args)
    else:
        reference_(*args)


def g_idx_problem(g_idx: torch.Tensor, num_groups: int) -> str | None:
    """Why g_idx (one group per input column) is out of range for num_groups, or None."""
    if g_idx.numel() == 0:
        return None
    low, high = int(g_idx.min()), int(g_idx.max())
    if low < 0 or high >= num_groups:
        return f"holds groups in [{low}, {high}] but scales has {num_groups} groups"
    return None


def gptq_zero_min(zeros_format: str) -> int:
    """The smallest zero point GPTQ's qzeros can hold in `zeros_format` (what a stored 0 reads back as)."""
    if zeros_format not in GPTQ_ZEROS_FORMATS:
        raise ValueError(
            f"zeros_format must be 'v1' (qzeros hold zero - 1) or 'v2' (qzeros hold the zero), got {zeros_format!r}"
        )
    return GPTQ_ZEROS_FORMATS[zeros_format]


def _check_dtype(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")


def _check_shape(t: torch.Tensor, name: str, shape: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({meaning}), got {tuple(t.shape)}")


def _check_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())}")


def _check_storage(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], target: torch.Tensor) -> None:
    _check_dtype(t, name, dtypes)
    _check_contiguous(t, name)
    _check_same_device(t, name, target, "the quantized weight")


def _check_common(qweight: torch.Tensor, direction: torch.Tensor, out_features: int, scale: float) -> None:
    _check_vector(direction, "direction", out_features, "the weight's d_model (out_features)")
    _check_same_device(direction, "direction", qweight, "the quantized weight")
    _check_scale(scale)


def _check_group_size(in_features: int, group_size: int) -> int:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size must be positive and divide in_features = {in_features}, got {group_size}")
    return in_features // group_size


def check_int8(qweight, row_scale, direction, scale) -> None:
    _check_storage(qweight, "qweight", (torch.int8,), qweight)
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [out, in], got shape {tuple(qweight.shape)}")
    out_features = qweight.shape[0]
    _check_float(row_scale, "row_scale")
    _check_storage(row_scale, "row_scale", (row_scale.dtype,), qweight)
    if tuple(row_scale.shape) not in ((out_features,), (out_features, 1)):
        raise ValueError(
            f"row_scale must have shape ({out_features},) or ({out_features}, 1), got {tuple(row_scale.shape)}"
        )
    _check_common(qweight, direction, out_features, scale)


def _check_int4_groups(qzeros, scales, num_groups: int, out_features: int, qweight) -> None:
    _check_storage(qzeros, "qzeros", (torch.int32,), qweight)
    _check_shape(qzeros, "qzeros", (num_groups, out_features // 8), "[groups, out / 8]")
    _check_float(scales, "scales")
    _check_storage(scales, "scales", (scales.dtype,), qweight)
    _check_shape(scales, "scales", (num_groups, out_features), "[groups, out]")


def check_gptq(qweight, qzeros, scales, g_idx, direction, group_size, scale, zeros_format="v1") -> None:
    gptq_zero_min(zeros_format)
    _check_storage(qweight, "qweight", (torch.int32,), qweight)
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [in / 8, out], got shape {tuple(qweight.shape)}")
    in_features, out_features = 8 * qweight.shape[0], qweight.shape[1]
    if out_features % 8:
        raise ValueError(f"qweight must have a multiple of 8 columns (out), got {out_features}")
    num_groups = _check_group_size(in_features, group_size)
    _check_int4_groups(qzeros, scales, num_groups, out_features, qweight)
    if g_idx is not None:
        _check_storage(g_idx, "g_idx", (torch.int32, torch.int64), qweight)
        _check_shape(g_idx, "g_idx", (in_features,), "[in]")
    _check_common(qweight, direction, out_features, scale)


def check_awq(qweight, qzeros, scales, direction, group_size, scale) -> None:
    _check_storage(qweight, "qweight", (torch.int32,), qweight)
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [in, out / 8], got shape {tuple(qweight.shape)}")
    in_features, out_features = qweight.shape[0], 8 * qweight.shape[1]
    num_groups = _check_group_size(in_features, group_size)
    _check_int4_groups(qzeros, scales, num_groups, out_features, qweight)
    _check_common(qweight, direction, out_features, scale)


def fp8_block_shape(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of the block that shares one scale, from weight_scale's shape."""
    out_features, in_features = weight.shape
    shape = tuple(weight_scale.shape)
    if weight_scale.numel() == 1:
        return out_features, in_features
    if shape in ((out_features,), (out_features, 1)):
        return 1, in_features
    if shape == (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK)):
        return FP8_BLOCK, FP8_BLOCK
    raise ValueError(
        f"weight_scale shape {shape} matches no granularity of weight {tuple(weight.shape)}: expected one element "
        f"per tensor, ({out_features},) or ({out_features}, 1) per row, or "
        f"({-(-out_features // FP8_BLOCK)}, {-(-in_features // FP8_BLOCK)}) per {FP8_BLOCK}x{FP8_BLOCK} block"
    )


def check_fp8(weight, weight_scale, direction, scale) -> tuple[int, int]:
    _check_storage(weight, "weight", (torch.float8_e4m3fn,), weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    _check_float(weight_scale, "weight_scale")
    _check_storage(weight_scale, "weight_scale", (weight_scale.dtype,), weight)
    block = fp8_block_shape(weight, weight_scale)
    _check_common(weight, direction, weight.shape[0], scale)
    return block


def check_nf4(
    packed, absmax, code, direction, blocksize, nested_absmax, nested_offset, nested_code, nested_blocksize, scale
) -> tuple[int, int]:
    """Checks the NF4 tensors and returns the weight's shape (out, in); out is direction's length."""
    _check_storage(packed, "packed", (torch.uint8,), packed)
    _check_common(packed, direction, direction.shape[0] if direction.dim() == 1 else -1, scale)
    out_features = direction.shape[0]
    numel = 2 * packed.numel()
    if out_features == 0 or numel % out_features:
        raise ValueError(f"packed holds {numel} values, not a multiple of direction's length {out_features} (out)")
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be positive and even (whole bytes per block), got {blocksize}")
    num_blocks = -(-numel // blocksize)
    nested = (nested_absmax, nested_offset, nested_code)
    if any(t is None for t in nested) and any(t is not None for t in nested):
        raise ValueError("nested_absmax, nested_offset and nested_code must be given together (double quantization)")
    _check_storage(absmax, "absmax", (torch.uint8,) if nested_absmax is not None else (torch.float32,), packed)
    _check_shape(absmax, "absmax", (num_blocks,), "one per block of blocksize values")
    _check_storage(code, "code", (torch.float32,), packed)
    _check_shape(code, "code", (16,), "the 4-bit levels")
    if nested_absmax is not None:
        if nested_blocksize <= 0:
            raise ValueError(f"nested_blocksize must be positive, got {nested_blocksize}")
        _check_storage(nested_absmax, "nested_absmax", (torch.float32,), packed)
        _check_shape(nested_absmax, "nested_absmax", (-(-num_blocks // nested_blocksize),), "one per nested block")
        _check_storage(nested_offset, "nested_offset", (torch.float32,), packed)
        if nested_offset.numel() != 1:
            raise ValueError(f"nested_offset must hold one value, got shape {tuple(nested_offset.shape)}")
        _check_storage(nested_code, "nested_code", (torch.float32,), packed)
        _check_shape(nested_code, "nested_code", (256,), "the 8-bit levels")
    return out_features, numel // out_features


@torch.library.register_fake("refusal::orthogonalize_int8")
def _(qweight, row_scale, direction, scale=1.0, absmax_scale=False):
    check_int8(qweight, row_scale, direction, scale)


@torch.library.register_fake("refusal::orthogonalize_gptq")
def _(qweight, qzeros, scales, g_idx, direction, group_size, scale=1.0, zeros_format="v1"):
    check_gptq(qweight, qzeros, scales, g_idx, direction, group_size, scale, zeros_format)


@torch.library.register_fake("refusal::orthogonalize_awq")
def _(qweight, qzeros, scales, direction, group_size, scale=1.0):
    check_awq(qweight, qzeros, scales, direction, group_size, scale)


@torch.library.register_fake("refusal::orthogonalize_fp8")
def _(weight, weight_scale, direction, scale=1.0):
    check_fp8(weight, weight_scale, direction, scale)


@torch.library.register_fake("refusal::orthogonalize_nf4")
def _(packed, absmax, code, direction, blocksize, nested_absmax, nested_offset, nested_code, nested_blocksize, scale):
    check_nf4(
        packed, absmax, code, direction, blocksize, nested_absmax, nested_offset, nested_code, nested_blocksize, scale
    )
