"""Argument checks shared by the public ops, the fake kernels and every Python kernel.

Which layer checks what:
  * metadata (dtype, shape, stride, device, overlap, scale): the C++ kernels (csrc/checks.h,
    csrc/quant_checks.h) and, for the fake, Triton and reference kernels, `check_*` here;
    both raise the same errors with the same messages, before anything is written;
  * data (zero or non-finite direction, index out of range): the CPU kernel, where the data
    is at hand; for GPU tensors the public wrappers, through `check_data_once`, once per
    tensor version, so that no kernel ever synchronizes with the host.

A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

import math

import torch
from torch.utils.weak import WeakIdKeyDictionary

# The norms orthogonalize_norm_preserving can keep: each column's or each row's.
NORM_AXES = ("column", "row")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_direction_dtype(t: torch.Tensor, name: str) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")


def check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_same_device(t: torch.Tensor, name: str, target: torch.Tensor, target_name: str) -> None:
    if t.device != target.device:
        raise ValueError(f"{name} is on {t.device} but {target_name} is on {target.device}")


def check_writable_rows(t: torch.Tensor, name: str) -> None:
    check_float(t, name)
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim, got a scalar")
    if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dim, got strides {tuple(t.stride())}")
    if torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(
            f"{name} has elements that overlap in memory (an expanded view?); pass a tensor that owns each element, e.g. .clone()"
        )


def check_vector(direction: torch.Tensor, name: str, length: int, length_of: str) -> None:
    check_direction_dtype(direction, name)
    if direction.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(direction.shape)}")
    if direction.shape[0] != length:
        raise ValueError(f"{name} has length {direction.shape[0]} but {length_of} is {length}")


def check_ablate(x: torch.Tensor, direction: torch.Tensor, scale: float) -> None:
    check_writable_rows(x, "x")
    check_vector(direction, "direction", x.shape[-1], "x.shape[-1]")
    check_same_device(direction, "direction", x, "x")
    check_scale(scale)


def index_is_per_batch_row(x: torch.Tensor, index: torch.Tensor) -> bool:
    """True when index holds one entry per batch row, broadcast over the middle dims of x."""
    return index.shape != x.shape[:-1]


def check_ablate_indexed(x: torch.Tensor, directions: torch.Tensor, index: torch.Tensor, scale: float) -> None:
    check_writable_rows(x, "x")
    check_direction_dtype(directions, "directions")
    if directions.dim() != 2:
        raise ValueError(f"directions must be 2-D [K, d], got shape {tuple(directions.shape)}")
    if directions.shape[1] != x.shape[-1]:
        raise ValueError(f"directions has rows of length {directions.shape[1]} but x.shape[-1] is {x.shape[-1]}")
    check_same_device(directions, "directions", x, "x")
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")
    per_vector = index.shape == x.shape[:-1]
    per_batch_row = x.dim() >= 2 and index.dim() == 1 and index.shape[0] == x.shape[0]
    if not (per_vector or per_batch_row):
        raise ValueError(
            f"index must have shape x.shape[:-1] = {tuple(x.shape[:-1])} or x.shape[:1], got {tuple(index.shape)}"
        )
    check_same_device(index, "index", x, "x")
    check_scale(scale)


def check_orthogonalize(weight: torch.Tensor, direction: torch.Tensor, scale: float) -> None:
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims [d_model, d_in], got shape {tuple(weight.shape)}")
    check_writable_rows(weight, "weight")
    check_vector(direction, "direction", weight.shape[-2], "weight.shape[-2] (d_model)")
    check_same_device(direction, "direction", weight, "weight")
    check_scale(scale)


def check_orthogonalize_norm_preserving(weight: torch.Tensor, direction: torch.Tensor, scale: float, axis: str) -> None:
    check_orthogonalize(weight, direction, scale)
    if axis not in NORM_AXES:
        raise ValueError(f"axis must be 'column' or 'row', got {axis!r}")


# ---- data checks, once per GPU tensor version

# GPU tensors whose data passed the checks, with the version they had then: each direction
# costs one host synchronization the first time it is used, and none afterwards.
_checked_versions = WeakIdKeyDictionary()


def check_data_once(t: torch.Tensor, name: str, find_problem, target: torch.Tensor) -> None:
    if target.device.type in ("cpu", "meta") or t.device != target.device or torch.compiler.is_compiling():
        # The CPU kernel checks the data itself; the kernels' metadata checks report a
        # device mismatch; a traced graph has no data to check.
        return
    if _checked_versions.get(t) == t._version:
        return
    problem = find_problem(t)
    if problem:
        raise ValueError(f"{name} {problem}")
    _checked_versions[t] = t._version


def nonzero_finite_rows(directions: torch.Tensor) -> str | None:
    norms = directions.float().reshape(-1, directions.shape[-1]).norm(dim=-1)
    bad = ~(torch.isfinite(norms) & (norms > 0))
    if bool(bad.any()):
        return f"must be finite and non-zero; rows with bad norms: {bad.nonzero().flatten().tolist()}"
    return None


def check_nonzero_finite(direction: torch.Tensor, name: str = "direction") -> None:
    """ValueError unless every row of `direction` is finite and non-zero, read now on any device
    (the references, which read their data anyway)."""
    problem = nonzero_finite_rows(direction)
    if problem:
        raise ValueError(f"{name} {problem}")


def check_direction_once(direction: torch.Tensor, target: torch.Tensor, name: str = "direction") -> None:
    """ValueError unless every row of `direction` is finite and non-zero (GPU targets: once per version)."""
    check_data_once(direction, name, nonzero_finite_rows, target)


def index_problem(index: torch.Tensor, num_directions: int) -> str | None:
    if index.numel() == 0:
        return None
    low, high = int(index.min()), int(index.max())
    if low < -1 or high >= num_directions:
        return f"holds values in [{low}, {high}]; valid values are -1 (skip) to {num_directions - 1}"
    return None


# ---- quantized formats (mirror csrc/quant_checks.h)

FP8_BLOCK = 128
# GPTQ's qzeros hold z - zero_min: "v1" stores zero points minus 1, "v2" stores them as is.
GPTQ_ZEROS_FORMATS = {"v1": 1, "v2": 0}


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


def check_dtype(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")


def _check_shape(t: torch.Tensor, name: str, shape: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({meaning}), got {tuple(t.shape)}")


def check_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())}")


def _check_storage(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], target: torch.Tensor) -> None:
    check_dtype(t, name, dtypes)
    check_contiguous(t, name)
    check_same_device(t, name, target, "the quantized weight")


def _check_common(qweight: torch.Tensor, direction: torch.Tensor, out_features: int, scale: float) -> None:
    check_vector(direction, "direction", out_features, "the weight's d_model (out_features)")
    check_same_device(direction, "direction", qweight, "the quantized weight")
    check_scale(scale)


def _check_group_size(in_features: int, group_size: int) -> int:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size must be positive and divide in_features = {in_features}, got {group_size}")
    return in_features // group_size


def check_int8(qweight, row_scale, direction, scale) -> None:
    _check_storage(qweight, "qweight", (torch.int8,), qweight)
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [out, in], got shape {tuple(qweight.shape)}")
    out_features = qweight.shape[0]
    check_float(row_scale, "row_scale")
    _check_storage(row_scale, "row_scale", (row_scale.dtype,), qweight)
    if tuple(row_scale.shape) not in ((out_features,), (out_features, 1)):
        raise ValueError(
            f"row_scale must have shape ({out_features},) or ({out_features}, 1), got {tuple(row_scale.shape)}"
        )
    _check_common(qweight, direction, out_features, scale)


def _check_int4_groups(qzeros, scales, num_groups: int, out_features: int, qweight) -> None:
    _check_storage(qzeros, "qzeros", (torch.int32,), qweight)
    _check_shape(qzeros, "qzeros", (num_groups, out_features // 8), "[groups, out / 8]")
    check_float(scales, "scales")
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
    check_float(weight_scale, "weight_scale")
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


# ---- GGUF blocks (mirror csrc/gguf_checks.h)

# "matrix": the rows are the d_model outputs of a linear weight [out][in] (GGUF's order);
# "rows": each row is a d_model vector (token embeddings).
GGUF_LAYOUTS = ("matrix", "rows")


def check_gguf_blocks(blocks: torch.Tensor, type_name: str, values_per_block: int, bytes_per_block: int) -> int:
    """Checks a [rows, bytes_per_row] uint8 tensor of `type_name` blocks; returns the row length in values."""
    check_dtype(blocks, "blocks", (torch.uint8,))
    if blocks.dim() != 2:
        raise ValueError(f"blocks must be 2-D [rows, bytes_per_row], got shape {tuple(blocks.shape)}")
    check_contiguous(blocks, "blocks")
    if blocks.shape[1] % bytes_per_block:
        raise ValueError(
            f"blocks has {blocks.shape[1]} bytes per row, not a multiple of {type_name}'s {bytes_per_block} "
            "bytes per block"
        )
    return blocks.shape[1] // bytes_per_block * values_per_block


def check_positive_int(name: str, value: int) -> int:
    """value, if it is an int of at least 1 (a bool is not); else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_passes(passes: int) -> None:
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
        raise ValueError(f"passes must be a non-negative int, got {passes!r}")


def check_gguf(
    blocks: torch.Tensor,
    direction: torch.Tensor,
    scale: float,
    layout: str,
    passes: int,
    type_name: str,
    values_per_block: int,
    bytes_per_block: int,
) -> int:
    """The metadata of refusal::orthogonalize_<type>; returns the row length in values."""
    row_length = check_gguf_blocks(blocks, type_name, values_per_block, bytes_per_block)
    check_gguf_arguments(blocks, row_length, direction, scale, layout)
    check_passes(passes)
    return row_length


def check_gguf_arguments(
    blocks: torch.Tensor, row_length: int, direction: torch.Tensor, scale: float, layout: str
) -> None:
    """The arguments of refusal::orthogonalize_<type> but the blocks, whose rows hold row_length values."""
    if layout not in GGUF_LAYOUTS:
        raise ValueError(f"layout must be 'matrix' or 'rows', got {layout!r}")
    if layout == "matrix":
        check_vector(direction, "direction", blocks.shape[0], "the rows of blocks (d_model)")
    else:
        check_vector(direction, "direction", row_length, "the row length of blocks (d_model)")
    check_same_device(direction, "direction", blocks, "blocks")
    check_scale(scale)
