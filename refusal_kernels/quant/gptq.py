"""int4, group-wise asymmetric, GPTQ layout (AutoGPTQ / optimum, checkpoint format v1).

Layout (W is [out, in] as in nn.Linear; G = group_size; groups = in / G):
  qweight  int32 [in / 8, out]: input column j of output i is bits 4*(j % 8) .. 4*(j % 8) + 3
           of qweight[j // 8, i] (packed along `in`, low bits first)
  qzeros   int32 [groups, out / 8]: the zero of (group g, output i) is stored as z - 1 in bits
           4*(i % 8) of qzeros[g, i // 8] (the v1 convention: readers add 1), so z is in [1, 16]
  scales   float16 (or bfloat16/float32) [groups, out]
  g_idx    optional int32 [in]: the group of input column j (act-order); default j // G
  W[i, j] = scales[g, i] * (q[i, j] - z[g, i]),  g = g_idx[j]
Requantization: each (group, output) gets a fresh scale and zero from the min and max of its
updated values (range widened to include 0, scale rounded up to the scales' dtype), so no
value needs clamping; values round to nearest.
"""

from __future__ import annotations

import torch

from ..ops import _check_data_once
from . import _common
from ._ops import check_gptq, g_idx_problem, run

ZERO_MIN = 1  # stored 0 reads back as zero point 1


def group_of_column(in_features: int, group_size: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """The group of each input column, int64 [in]."""
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(in_features) // group_size


def pack(values: torch.Tensor) -> torch.Tensor:
    """int4 values [out, in] (0..15) -> qweight int32 [in / 8, out]."""
    return _common.pack_nibbles(values.T, dim=0)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [in / 8, out] -> int4 values int32 [out, in]."""
    return _common.unpack_nibbles(qweight, dim=0).T


def pack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """Zero points int [groups, out] in 1..16 -> qzeros int32 [groups, out / 8] (stored minus 1)."""
    return _common.pack_nibbles(zeros - 1, dim=1)


def unpack_zeros(qzeros: torch.Tensor) -> torch.Tensor:
    """qzeros int32 [groups, out / 8] -> zero points int32 [groups, out] in 1..16."""
    return _common.unpack_nibbles(qzeros, dim=1) + 1


def dequantize(qweight, qzeros, scales, g_idx, group_size: int) -> torch.Tensor:
    """The fp32 weight [out, in]."""
    values = unpack(qweight)
    groups = group_of_column(values.shape[1], group_size, g_idx)
    return _common.dequantize_int4_groups(values, scales, unpack_zeros(qzeros), groups)


def quantize(weight: torch.Tensor, group_size: int, g_idx: torch.Tensor | None = None, scales_dtype=torch.float16):
    """(qweight, qzeros, scales) of weight [out, in] with fresh group-wise scales and zeros."""
    groups = group_of_column(weight.shape[1], group_size, g_idx)
    num_groups = weight.shape[1] // group_size
    values, scales, zeros = _common.quantize_int4_groups(weight, groups, num_groups, ZERO_MIN, scales_dtype)
    return pack(values), pack_zeros(zeros), scales


def check(qweight, qzeros, scales, g_idx, direction, group_size: int, scale: float = 1.0) -> None:
    """The op's metadata checks and g_idx's range (read on the host); writes nothing."""
    check_gptq(qweight, qzeros, scales, g_idx, direction, group_size, scale)
    problem = None if g_idx is None else g_idx_problem(g_idx, scales.shape[0])
    if problem:
        raise ValueError(f"g_idx {problem}")


def orthogonalize_reference_(qweight, qzeros, scales, g_idx, direction, group_size: int, scale: float = 1.0) -> None:
    """Dequantize, orthogonalize in fp32, requantize with fresh scales and zeros; writes all three."""
    check(qweight, qzeros, scales, g_idx, direction, group_size, scale)
    updated = _common.orthogonalized_float(dequantize(qweight, qzeros, scales, g_idx, group_size), direction, scale)
    for target, fresh in zip(
        (qweight, qzeros, scales), quantize(updated, group_size, g_idx, scales.dtype), strict=True
    ):
        target.copy_(fresh)


def orthogonalize_(qweight, qzeros, scales, g_idx, direction, group_size: int, scale: float = 1.0) -> None:
    """In-place W <- W - scale * d (d^T W) on the packed storage (the fused kernel of the storage's device)."""
    if g_idx is not None:
        # GPU storage: checked here once per version (the CPU kernel checks it itself).
        _check_data_once(g_idx, "g_idx", lambda t: g_idx_problem(t, scales.shape[0]), qweight)
    run("gptq", orthogonalize_reference_, direction, qweight, qzeros, scales, g_idx, direction, group_size, scale)
