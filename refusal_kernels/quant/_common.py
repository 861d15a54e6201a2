"""Pieces shared by the pure-torch references of every quantized format.

The C++ and Triton kernels follow the same rules (see csrc/cpu/orthogonalize_quant.cpp), so
that a kernel and its reference differ only by fp32 summation order.
"""

from __future__ import annotations

import torch

from .. import reference
from .._checks import check_nonzero_finite

NIBBLES_PER_INT32 = 8


def round_up_to_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """value (fp32, >= 0) rounded to `dtype`, upwards: a scale stored in fp16 still covers the range."""
    stored = value.to(dtype)
    if dtype == torch.float32:
        return stored
    bits = stored.view(torch.int16)
    bumped = torch.where(stored.float() < value, bits + 1, bits)
    return bumped.view(dtype)


def symmetric_scale(absmax: torch.Tensor, qmax: float, dtype: torch.dtype) -> torch.Tensor:
    """absmax / qmax rounded up to `dtype`; an all-zero group gets scale 1 (any scale is exact)."""
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    return round_up_to_dtype(scale, dtype)


def asymmetric_int4_scale_zero(
    low: torch.Tensor, high: torch.Tensor, zero_min: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point z of a 4-bit asymmetric group, W = scale * (q - z), q in [0, 15].

    The range is widened to include 0, z is limited to [zero_min, zero_min + 15] (what the
    format can store), and the scale is then chosen so that [low, high] lies inside
    [-z * scale, (15 - z) * scale]: no value needs clamping. Returns (scale in `dtype`, z int32).
    """
    low = low.clamp(max=0)
    high = high.clamp(min=0)
    spread = (high - low) / 15
    z = torch.where(spread > 0, torch.round(-low / spread.clamp(min=torch.finfo(torch.float32).tiny)), 0)
    z = z.clamp(zero_min, zero_min + 15)
    z = torch.where(high > 0, z.clamp(max=14), z)
    z = torch.where(low < 0, z.clamp(min=1), z)
    scale = torch.maximum(high / (15 - z).clamp(min=1), -low / z.clamp(min=1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return round_up_to_dtype(scale, dtype), z.to(torch.int32)


def quantize_int4(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """round(weight / scale) + zero in [0, 15] (int32); the clamp only resolves exact ties at the edge."""
    return (torch.round(weight / scale.float()) + zero).clamp(0, 15).to(torch.int32)


def pack_nibbles(values: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Pack int4 values (int, 0..15) eight per int32 along `dim`; bits 4k..4k+3 hold element order[k]."""
    values = values.movedim(dim, -1).to(torch.int64)
    grouped = values.reshape(*values.shape[:-1], -1, NIBBLES_PER_INT32)[..., list(order)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (grouped << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_nibbles(words: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Inverse of `pack_nibbles`: int32 words -> int32 values 0..15, 8x longer along `dim`."""
    words = words.movedim(dim, -1)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (words[..., None] >> shifts) & 0xF
    inverse = [order.index(k) for k in range(NIBBLES_PER_INT32)]
    values = nibbles[..., inverse].reshape(*words.shape[:-1], -1)
    return values.movedim(-1, dim).contiguous()


def orthogonalized_float(dequantized: torch.Tensor, direction: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense reference applied to a dequantized fp32 weight [d_model, d_in].

    Checks the direction's data first (as the CPU kernels do), before anything is written.
    """
    check_nonzero_finite(direction)
    return reference.orthogonalize(dequantized.float(), direction, scale)


def dequantize_int4_groups(
    values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_of_column: torch.Tensor
) -> torch.Tensor:
    """fp32 W [out, in] from int4 values [out, in], scales and zeros [groups, out], group per input column [in]."""
    column_scale = scales.float()[group_of_column].T
    column_zero = zeros[group_of_column].T
    return (values - column_zero).float() * column_scale


def quantize_int4_groups(
    weight: torch.Tensor, group_of_column: torch.Tensor, num_groups: int, zero_min: int, scales_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values int32 [out, in] in 0..15, scales [groups, out] of scales_dtype, zeros int32 [groups, out])."""
    weight = weight.float()
    index = group_of_column.long().expand(weight.shape[0], -1)
    shape = (weight.shape[0], num_groups)
    low = torch.zeros(shape).scatter_reduce(1, index, weight, "amin", include_self=True)
    high = torch.zeros(shape).scatter_reduce(1, index, weight, "amax", include_self=True)
    scales, zeros = asymmetric_int4_scale_zero(low.T.contiguous(), high.T.contiguous(), zero_min, scales_dtype)
    values = quantize_int4(weight, scales.float()[group_of_column].T, zeros[group_of_column].T)
    return values, scales, zeros
