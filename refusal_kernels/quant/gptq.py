"""int4, group-wise asymmetric, GPTQ layout (AutoGPTQ / optimum / GPTQModel).

Layout (W is [out, in] as in nn.Linear; G = group_size; groups = in / G):
  qweight  int32 [in / 8, out]: input column j of output i is bits 4*(j % 8) .. 4*(j % 8) + 3
           of qweight[j // 8, i] (packed along `in`, low bits first)
  qzeros   int32 [groups, out / 8]: the zero z of (group g, output i) in bits 4*(i % 8) of
           qzeros[g, i // 8], stored as `zeros_format` says:
             "v1"  z - 1, so z is in [1, 16] (AutoGPTQ; GPTQModel's checkpoint_format "gptq")
             "v2"  z itself, in [0, 15] (GPTQModel's checkpoint_format "gptq_v2", and the
                   in-memory format of its kernels that convert v1 checkpoints at load)
  scales   float16 (or bfloat16/float32) [groups, out]
  g_idx    optional int32 [in]: the group of input column j (act-order); default j // G
  W[i, j] = scales[g, i] * (q[i, j] - z[g, i]),  g = g_idx[j]
Requantization: each (group, output) gets a fresh scale and zero from the min and max of its
updated values (range widened to include 0, scale rounded up to the scales' dtype), so no
value needs clamping; values round to nearest.
"""

from __future__ import annotations

import torch

from .._checks import check_data_once, check_direction_once, check_gptq, g_idx_problem, gptq_zero_min
from . import _common


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


def pack_zeros(zeros: torch.Tensor, zeros_format: str = "v1") -> torch.Tensor:
    """Zero points int [groups, out] (1..16 for "v1", 0..15 for "v2") -> qzeros int32 [groups, out / 8]."""
    return _common.pack_nibbles(zeros - gptq_zero_min(zeros_format), dim=1)


def unpack_zeros(qzeros: torch.Tensor, zeros_format: str = "v1") -> torch.Tensor:
    """qzeros int32 [groups, out / 8] -> zero points int32 [groups, out] (1..16 for "v1", 0..15 for "v2")."""
    return _common.unpack_nibbles(qzeros, dim=1) + gptq_zero_min(zeros_format)


def dequantize(qweight, qzeros, scales, g_idx, group_size: int, zeros_format: str = "v1") -> torch.Tensor:
    """The fp32 weight [out, in]."""
    values = unpack(qweight)
    groups = group_of_column(values.shape[1], group_size, g_idx)
    return _common.dequantize_int4_groups(values, scales, unpack_zeros(qzeros, zeros_format), groups)


def quantize(
    weight: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    scales_dtype=torch.float16,
    zeros_format: str = "v1",
):
    """(qweight, qzeros, scales) of weight [out, in] with fresh group-wise scales and zeros."""
    groups = group_of_column(weight.shape[1], group_size, g_idx)
    num_groups = weight.shape[1] // group_size
    zero_min = gptq_zero_min(zeros_format)
    values, scales, zeros = _common.quantize_int4_groups(weight, groups, num_groups, zero_min, scales_dtype)
    return pack(values), pack_zeros(zeros, zeros_format), scales


def check(
    qweight, qzeros, scales, g_idx, direction, group_size: int, scale: float = 1.0, zeros_format: str = "v1"
) -> None:
    """The op's metadata checks and g_idx's range (read on the host); writes nothing."""
    check_gptq(qweight, qzeros, scales, g_idx, direction, group_size, scale, zeros_format)
    problem = None if g_idx is None else g_idx_problem(g_idx, scales.shape[0])
    if problem:
        raise ValueError(f"g_idx {problem}")


def orthogonalize_reference_(
    qweight, qzeros, scales, g_idx, direction, group_size: int, scale: float = 1.0, zeros_format: str = "v1"
) -> None:
    """Dequantize, orthogonalize in fp32, requantize with fresh scales and zeros; writes all three."""
    check(qweight, qzeros, scales, g_idx, direction, group_size, scale, zeros_format)
    dequantized = dequantize(qweight, qzeros, scales, g_idx, group_size, zeros_format)
    updated = _common.orthogonalized_float(dequantized, direction, scale)
    fresh = quantize(updated, group_size, g_idx, scales.dtype, zeros_format)
    for target, values in zip((qweight, qzeros, scales), fresh, strict=True):
        target.copy_(values)


def orthogonalize_(
    qweight, qzeros, scales, g_idx, direction, group_size: int, scale: float = 1.0, zeros_format: str = "v1"
) -> None:
    """In-place W <- W - scale * d (d^T W) on the packed storage (the fused kernel of the storage's device).

    zeros_format: how qzeros stores each zero point, "v1" (z - 1) or "v2" (z); see the module docstring.
    """
    gptq_zero_min(zeros_format)  # a ValueError, where the op's schema would reject a non-string with a RuntimeError
    if g_idx is not None:
        # GPU storage: checked here once per version (the CPU kernel checks it itself).
        check_data_once(g_idx, "g_idx", lambda t: g_idx_problem(t, scales.shape[0]), qweight)
    check_direction_once(direction, qweight)
    torch.ops.refusal.orthogonalize_gptq(qweight, qzeros, scales, g_idx, direction, group_size, scale, zeros_format)
