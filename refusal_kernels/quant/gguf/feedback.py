"""Requantization with feedback: edit GGUF blocks so that what they store really lacks the direction.

Requantizing an orthogonalized block rounds each value to the block's new grid. Where the
removed component is smaller than half a grid step, rounding puts the value back on the level
it came from, so a plain requantization (what llama.cpp's quantizer does to the fp32 edit)
keeps much of the component along d: on the default model's writers, for a random direction,
about 8 % (Q6_K) to 60 % (Q4_K) of it (README).

The `passes` argument of every GGUF edit (`quant.gguf.orthogonalize_`, the ops
`refusal::orthogonalize_<type>`) makes the plain edit and then `passes` more, each requantizing
the original values minus d times a projection that grows by what the last result still held
along d:

    target = W0 - d a^T,  a = s c + sum_k (d^T Q_k - (1 - s) c),  c = d^T W0

(the same per row v for the "rows" layout). The target stays off the grid, so the feedback
accumulates instead of being rounded away, and the stored component along d shrinks with each
pass, at a small cost in the error against the fp32 edit (README).

`orthogonalize_reference_` is the pure-torch version, the reference of the ops' passes (and
their fallback kernel). Its passes work on chunks of rows, from a copy of the original bytes:
extra memory is that copy and O(chunk) fp32, as in the C++ kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch

from ..._checks import check_passes
from ._blocks import add_column_component

# Rows dequantized at a time by the feedback passes.
CHUNK_ROWS = 256
# The passes a GGUF edit makes unless told otherwise: the second takes out about half of what
# the first leaves, a third little more (README).
DEFAULT_PASSES = 2


def _chunks(rows: int) -> Iterator[slice]:
    """Slices of CHUNK_ROWS rows; one (empty) slice for no rows, so that sums and concatenations have a term."""
    return (slice(start, start + CHUNK_ROWS) for start in range(0, max(rows, 1), CHUNK_ROWS))


def _along(blocks: torch.Tensor, codec: ModuleType, type_name: str, unit: torch.Tensor, layout: str) -> torch.Tensor:
    """The stored component along the unit direction: d^T W [row_length] ("matrix") or v.d per row."""
    if layout == "rows":
        return torch.cat([codec.dequantize(blocks[rows], type_name) @ unit for rows in _chunks(blocks.shape[0])])
    values_per_block, bytes_per_block = codec.FORMATS[type_name]
    total = torch.zeros(blocks.shape[1] // bytes_per_block * values_per_block, device=blocks.device)
    for rows in _chunks(blocks.shape[0]):
        total = add_column_component(total, unit[rows], codec.dequantize(blocks[rows], type_name))
    return total


def _requantize_(blocks, original, codec, type_name, unit, projection, layout) -> None:
    """blocks <- quantize(W0 - d a^T) ("matrix") or quantize(v0 - a_v d) per row, chunk by chunk."""
    for rows in _chunks(blocks.shape[0]):
        values = codec.dequantize(original[rows], type_name)
        if layout == "matrix":
            values -= torch.outer(unit[rows], projection)
        else:
            values -= torch.outer(projection[rows], unit)
        blocks[rows] = codec.quantize(values, type_name)


def orthogonalize_reference_(
    codec: ModuleType,
    blocks: torch.Tensor,
    type_name: str,
    direction: torch.Tensor,
    scale: float = 1.0,
    layout: str = "matrix",
    passes: int = 0,
) -> None:
    """`codec.orthogonalize_reference_` (the plain edit of the format module `codec`), then
    `passes` feedback passes (see the module docstring), in place. Bad arguments raise
    ValueError/TypeError naming the argument before anything is written."""
    check_passes(passes)
    original = blocks.clone() if passes else None
    codec.orthogonalize_reference_(blocks, type_name, direction, scale, layout)
    if not passes:
        return
    unit = direction.detach().float()
    unit = unit / unit.norm()
    component = _along(original, codec, type_name, unit, layout)
    kept, projection = (1 - scale) * component, scale * component
    for _ in range(passes):
        projection = projection + (_along(blocks, codec, type_name, unit, layout) - kept)
        _requantize_(blocks, original, codec, type_name, unit, projection, layout)
