"""fp8 e4m3 (torch.float8_e4m3fn) with per-tensor, per-row or 128x128 block scales.

Layout (W is [out, in] as in nn.Linear):
  weight        float8_e4m3fn [out, in], row-major, finite values in [-448, 448]
  weight_scale  float32 (or bfloat16/float16), the dequantization multiplier ("scale_inv";
                torchao's Float8Tensor.scale is the same multiplier),
                W[i, j] = weight[i, j] * weight_scale[block of (i, j)]; its shape sets the
                granularity:
                  one element ([], [1], [1, 1], ...)        per tensor (torchao: [1, 1])
                  [out] or [out, 1]                         per row
                  [ceil(out / 128), ceil(in / 128)]         per 128 x 128 block (DeepSeek-V3,
                                                            compressed-tensors "block")
Requantization: each block's scale is its updated absmax / 448, rounded up to the scale's
dtype, so no value saturates; values round to nearest e4m3. A per-tensor scale is chosen
from the whole updated matrix before anything is written.
"""

from __future__ import annotations

import torch

from .._checks import check_direction_once, check_fp8, fp8_block_shape
from . import _common

FP8_MAX = 448.0


def _expand(weight_scale: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    grid = weight_scale.float().reshape(-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    return grid.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def dequantize(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in]."""
    block = fp8_block_shape(weight, weight_scale)
    return weight.float() * _expand(weight_scale, block, weight.shape)


def quantize(
    weight: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight [out, in], weight_scale [ceil(out / rows), ceil(in / cols)]) for block (rows, cols)."""
    weight = weight.float()
    rows, cols = weight.shape
    padded = torch.nn.functional.pad(weight.abs(), (0, -cols % block[1], 0, -rows % block[0]))
    grid = padded.reshape(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
    weight_scale = _common.symmetric_scale(grid.amax(dim=(1, 3)), FP8_MAX, scale_dtype)
    scaled = weight / _expand(weight_scale, block, weight.shape)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), weight_scale


def orthogonalize_reference_(weight, weight_scale, direction, scale: float = 1.0) -> None:
    """Dequantize, orthogonalize in fp32, requantize with fresh scales of the same granularity."""
    block = check_fp8(weight, weight_scale, direction, scale)
    updated = _common.orthogonalized_float(dequantize(weight, weight_scale), direction, scale)
    new_weight, new_scale = quantize(updated, block, weight_scale.dtype)
    weight.copy_(new_weight)
    weight_scale.copy_(new_scale.reshape(weight_scale.shape))


def orthogonalize_(weight, weight_scale, direction, scale: float = 1.0) -> None:
    """In-place W <- W - scale * d (d^T W) on the fp8 storage (the fused kernel of the storage's device)."""
    check_direction_once(direction, weight)
    torch.ops.refusal.orthogonalize_fp8(weight, weight_scale, direction, scale)
