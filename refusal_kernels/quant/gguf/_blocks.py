"""What every GGUF block format shares: the checks of a tensor's blocks, fp16 scales as bytes,
and the edit (dequantize, orthogonalize in fp32, requantize in place)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ... import reference
from ..._checks import (
    check_contiguous,
    check_dtype,
    check_nonzero_finite,
    check_same_device,
    check_scale,
    check_vector,
)
from .._common import orthogonalized_float

# "matrix": the rows are the d_model outputs of a linear weight [out][in] (GGUF's order);
# "rows": each row is a d_model vector (token embeddings).
LAYOUTS = ("matrix", "rows")


def check_type_name(type_name: str, formats: dict[str, tuple[int, int]]) -> None:
    if type_name not in formats:
        raise ValueError(f"type_name must be one of {', '.join(formats)}, got {type_name!r}")


def check_blocks(blocks: torch.Tensor, type_name: str, formats: dict[str, tuple[int, int]]) -> int:
    """Checks a [rows, bytes_per_row] uint8 tensor of `type_name` blocks (formats: type ->
    (values, bytes) per block); returns the row length in values."""
    check_type_name(type_name, formats)
    check_dtype(blocks, "blocks", (torch.uint8,))
    if blocks.dim() != 2:
        raise ValueError(f"blocks must be 2-D [rows, bytes_per_row], got shape {tuple(blocks.shape)}")
    check_contiguous(blocks, "blocks")
    values_per_block, bytes_per_block = formats[type_name]
    if blocks.shape[1] % bytes_per_block:
        raise ValueError(
            f"blocks has {blocks.shape[1]} bytes per row, not a multiple of {type_name}'s {bytes_per_block} "
            "bytes per block"
        )
    return blocks.shape[1] // bytes_per_block * values_per_block


def fp16_values(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] (a little-endian fp16 each) -> fp32 [..., 1]."""
    return raw.contiguous().view(torch.float16).float()


def fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """fp32 [..., 1] -> uint8 [..., 2], rounded to the nearest fp16 (ties to even) as the C cast does."""
    return values.to(torch.float16).view(torch.uint8)


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
    whose own layout the caller has checked; every other argument is checked here, before the write."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'matrix' or 'rows', got {layout!r}")
    if layout == "matrix":
        check_vector(direction, "direction", blocks.shape[0], "the rows of blocks (d_model)")
    else:
        check_vector(direction, "direction", row_length, "the row length of blocks (d_model)")
    check_same_device(direction, "direction", blocks, "blocks")
    check_scale(scale)
    weight = dequantize(blocks)
    if layout == "matrix":
        updated = orthogonalized_float(weight, direction, scale)
    else:
        check_nonzero_finite(direction)
        updated = reference.ablate(weight, direction, scale)
    blocks.copy_(quantize(updated))
