"""int8, symmetric, one scale per output channel.

Layout (the dequantized weight W is [d_model (out), d_in (in)], as in nn.Linear):
  qweight    int8 [out, in], row-major, values in [-127, 127]
  row_scale  float32, float16 or bfloat16, [out] or [out, 1]
Two conventions for the scale, chosen by `absmax_scale`:
  * torchao (`Int8Tensor.qdata`, `.scale` [N, 1]):  W[i, j] = qweight[i, j] * row_scale[i]
  * bitsandbytes (`Int8Params.CB`, `.SCB` [out] fp32, the row's absmax):
        W[i, j] = qweight[i, j] * row_scale[i] / 127
Requantization picks each row's scale from its updated absmax (rounded up to the scale's
dtype) and rounds to nearest, so no value is clamped.
"""

from __future__ import annotations

import torch

from .._checks import check_direction_once, check_int8
from . import _common

QMAX = 127


def _divisor(absmax_scale: bool) -> float:
    return QMAX if absmax_scale else 1.0


def dequantize(qweight: torch.Tensor, row_scale: torch.Tensor, absmax_scale: bool = False) -> torch.Tensor:
    """The fp32 weight [out, in]."""
    return qweight.float() * (row_scale.float().reshape(-1, 1) / _divisor(absmax_scale))


def quantize(
    weight: torch.Tensor, absmax_scale: bool = False, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 [out, in], row_scale [out] of `scale_dtype`) with fresh per-row scales."""
    weight = weight.float()
    step = _common.symmetric_scale(weight.abs().amax(dim=1), QMAX, scale_dtype)
    qweight = torch.round(weight / step.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    if absmax_scale:
        return qweight, _common.round_up_to_dtype(step.float() * QMAX, scale_dtype)
    return qweight, step


def orthogonalize_reference_(
    qweight: torch.Tensor, row_scale: torch.Tensor, direction: torch.Tensor, scale: float = 1.0, absmax_scale=False
) -> None:
    """Dequantize, orthogonalize in fp32, requantize with fresh scales; writes both tensors."""
    check_int8(qweight, row_scale, direction, scale)
    updated = _common.orthogonalized_float(dequantize(qweight, row_scale, absmax_scale), direction, scale)
    new_q, new_scale = quantize(updated, absmax_scale, row_scale.dtype)
    qweight.copy_(new_q)
    row_scale.copy_(new_scale.reshape(row_scale.shape))


def orthogonalize_(
    qweight: torch.Tensor, row_scale: torch.Tensor, direction: torch.Tensor, scale: float = 1.0, absmax_scale=False
) -> None:
    """In-place W <- W - scale * d (d^T W) on the quantized storage (the fused kernel of the storage's device)."""
    check_direction_once(direction, qweight)
    torch.ops.refusal.orthogonalize_int8(qweight, row_scale, direction, scale, absmax_scale)
