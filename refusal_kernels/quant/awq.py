"""int4, group-wise asymmetric, AWQ "GEMM" layout (AutoAWQ WQLinear_GEMM).

Layout (W is [out, in] as in nn.Linear; G = group_size; groups = in / G):
  qweight  int32 [in, out / 8]: packed along `out`; bits 4k .. 4k + 3 of qweight[j, w] hold
           output 8w + ORDER[k] with ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
  qzeros   int32 [groups, out / 8]: same packing and order, zero points stored as is (0..15)
  scales   float16 (or bfloat16/float32) [groups, out]
  W[i, j] = scales[j // G, i] * (q[i, j] - z[j // G, i])
Requantization: as for GPTQ (fresh scale and zero per group and output from the updated
values, range widened to include 0, no clamping).
"""

from __future__ import annotations

import torch

from .._checks import check_awq, check_direction_once
from . import _common

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
ZERO_MIN = 0


def pack(values: torch.Tensor) -> torch.Tensor:
    """int4 values [out, in] (0..15) -> qweight int32 [in, out / 8]."""
    return _common.pack_nibbles(values.T, dim=1, order=ORDER)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [in, out / 8] -> int4 values int32 [out, in]."""
    return _common.unpack_nibbles(qweight, dim=1, order=ORDER).T


def pack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """Zero points int [groups, out] (0..15) -> qzeros int32 [groups, out / 8]."""
    return _common.pack_nibbles(zeros, dim=1, order=ORDER)


def unpack_zeros(qzeros: torch.Tensor) -> torch.Tensor:
    """qzeros int32 [groups, out / 8] -> zero points int32 [groups, out]."""
    return _common.unpack_nibbles(qzeros, dim=1, order=ORDER)


def _groups(in_features: int, group_size: int) -> torch.Tensor:
    return torch.arange(in_features) // group_size


def dequantize(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """The fp32 weight [out, in]."""
    values = unpack(qweight)
    return _common.dequantize_int4_groups(values, scales, unpack_zeros(qzeros), _groups(values.shape[1], group_size))


def quantize(weight: torch.Tensor, group_size: int, scales_dtype=torch.float16):
    """(qweight, qzeros, scales) of weight [out, in] with fresh group-wise scales and zeros."""
    groups = _groups(weight.shape[1], group_size)
    values, scales, zeros = _common.quantize_int4_groups(
        weight, groups, weight.shape[1] // group_size, ZERO_MIN, scales_dtype
    )
    return pack(values), pack_zeros(zeros), scales


def orthogonalize_reference_(qweight, qzeros, scales, direction, group_size: int, scale: float = 1.0) -> None:
    """Dequantize, orthogonalize in fp32, requantize with fresh scales and zeros; writes all three."""
    check_awq(qweight, qzeros, scales, direction, group_size, scale)
    updated = _common.orthogonalized_float(dequantize(qweight, qzeros, scales, group_size), direction, scale)
    for target, fresh in zip((qweight, qzeros, scales), quantize(updated, group_size, scales.dtype), strict=True):
        target.copy_(fresh)


def orthogonalize_(qweight, qzeros, scales, direction, group_size: int, scale: float = 1.0) -> None:
    """In-place W <- W - scale * d (d^T W) on the packed storage (the fused kernel of the storage's device)."""
    check_direction_once(direction, qweight)
    torch.ops.refusal.orthogonalize_awq(qweight, qzeros, scales, direction, group_size, scale)
