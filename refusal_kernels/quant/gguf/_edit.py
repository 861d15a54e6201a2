"""The edit every GGUF block format shares: dequantize, orthogonalize in fp32, requantize in place."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ... import reference
from ..._checks import check_nonzero_finite, check_same_device, check_scale, check_vector
from .._common import orthogonalized_float

# "matrix": the rows are the d_model outputs of a linear weight [out][in] (GGUF's order);
# "rows": each row is a d_model vector (token embeddings).
LAYOUTS = ("matrix", "rows")


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
