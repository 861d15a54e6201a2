"""What every GGUF block format shares: the checks of a tensor's blocks, fp16 scales as bytes,
and the edit (dequantize, orthogonalize in fp32, requantize in place)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ... import reference
from ..._checks import GGUF_LAYOUTS, check_gguf_arguments, check_gguf_blocks, check_nonzero_finite

LAYOUTS = GGUF_LAYOUTS


def check_type_name(type_name: str, formats: dict[str, tuple[int, int]]) -> None:
    if type_name not in formats:
        raise ValueError(f"type_name must be one of {', '.join(formats)}, got {type_name!r}")


def check_blocks(blocks: torch.Tensor, type_name: str, formats: dict[str, tuple[int, int]]) -> int:
    """Checks a [rows, bytes_per_row] uint8 tensor of `type_name` blocks (formats: type ->
    (values, bytes) per block); returns the row length in values."""
    check_type_name(type_name, formats)
    return check_gguf_blocks(blocks, type_name, *formats[type_name])


def fp16_values(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] (a little-endian fp16 each) -> fp32 [..., 1]."""
    return raw.contiguous().view(torch.float16).float()


def fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """fp32 [..., 1] -> uint8 [..., 2], rounded to the nearest fp16 (ties to even) as the C cast does."""
    return values.to(torch.float16).view(torch.uint8)


def add_column_component(total: torch.Tensor, unit: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """total + unit^T weight [row_length], summed down the rows in order with each product rounded
    before its sum: the C++ kernels' column pass, bit for bit. torch's `unit @ weight` sums in an
    order that depends on the machine's BLAS, which moves the requantized blocks by a step."""
    for row in range(weight.shape[0]):
        total = total + unit[row] * weight[row]
    return total


def orthogonalize_blocks_(
    blocks: torch.Tensor,
    row_length: int,
    direction: torch.Tensor,
    scale: float,
    layout: str,
    dequantize: Callable[[torch.Tensor], torch.Tensor],
    quantize: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """W <- W - scale d (d^T W) ("matrix") or v <- v - scale (v.d) d per row ("rows") on blocks
    whose own layout the caller has checked; every other argument, the direction's data and the
    updated values (finite) are checked here, before the write."""
    check_gguf_arguments(blocks, row_length, direction, scale, layout)
    weight = dequantize(blocks)
    check_nonzero_finite(direction)
    if layout == "matrix":
        unit = reference.unit(direction)
        component = add_column_component(weight.new_zeros(row_length), unit, weight)
        updated = weight - (scale * unit)[:, None] * component
    else:
        updated = reference.ablate(weight, direction, scale)
    if not bool(torch.isfinite(updated).all()):
        raise ValueError("blocks must dequantize to finite values that stay finite in float32 after the update")
    blocks.copy_(quantize(updated))
