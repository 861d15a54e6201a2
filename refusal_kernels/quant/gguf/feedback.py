"""Requantization with feedback: edit GGUF blocks so that what they store really lacks the direction.

Requantizing an orthogonalized block rounds each value to the block's new grid. Where the
removed component is smaller than half a grid step, rounding puts the value back on the level
it came from, so a plain requantization (what llama.cpp's quantizer does to the fp32 edit)
keeps much of the component along d: on the default model's writers, for a random direction,
about 8 % (Q6_K) to 60 % (Q4_K) of it (README).

`orthogonalize_with_feedback_` makes that plain edit (`orthogonalize_`, the format's fused op)
and then `passes` more, each requantizing the original values minus d times a projection that
grows by what the last result still held along d:

    target = W0 - d a^T,  a = s c + sum_k (d^T Q_k - (1 - s) c),  c = d^T W0

(the same per row v for the "rows" layout). The target stays off the grid, so the feedback
accumulates instead of being rounded away, and the stored component along d shrinks with each
pass, at a small cost in the error against the fp32 edit (README). The passes work on chunks of
rows, from a copy of the original bytes: extra memory is that copy and O(chunk) fp32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import FORMATS, dequantize, orthogonalize_, quantize

# Rows dequantized at a time by the feedback passes.
CHUNK_ROWS = 256
# The passes a GGUF edit makes unless told otherwise: the second takes out about half of what
# the first leaves, a third little more (README).
DEFAULT_PASSES = 2


def _chunks(rows: int) -> Iterator[slice]:
    return (slice(start, start + CHUNK_ROWS) for start in range(0, rows, CHUNK_ROWS))


def _along(blocks: torch.Tensor, type_name: str, unit: torch.Tensor, layout: str) -> torch.Tensor:
    """The stored component along the unit direction: d^T W [row_length] ("matrix") or v.d per row."""
    if layout == "rows":
        return torch.cat([dequantize(blocks[rows], type_name) @ unit for rows in _chunks(blocks.shape[0])])
    total = torch.zeros(blocks.shape[1] // FORMATS[type_name][1] * FORMATS[type_name][0])
    for rows in _chunks(blocks.shape[0]):
        total += unit[rows] @ dequantize(blocks[rows], type_name)
    return total


def _requantize_(blocks, original, type_name, unit, projection, layout) -> None:
    """blocks <- quantize(W0 - d a^T) ("matrix") or quantize(v0 - a_v d) per row, chunk by chunk."""
    for rows in _chunks(blocks.shape[0]):
        values = dequantize(original[rows], type_name)
        if layout == "matrix":
            values -= torch.outer(unit[rows], projection)
        else:
            values -= torch.outer(projection[rows], unit)
        blocks[rows] = quantize(values, type_name)


def orthogonalize_with_feedback_(
    blocks: torch.Tensor,
    type_name: str,
    direction: torch.Tensor,
    scale: float = 1.0,
    layout: str = "matrix",
    passes: int = DEFAULT_PASSES,
) -> torch.Tensor:
    """`orthogonalize_`, then `passes` feedback passes (see the module docstring); returns blocks.

    passes=0 is the plain edit. Bad arguments raise ValueError/TypeError naming the argument
    before anything is written (the plain edit checks the rest).
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
        raise ValueError(f"passes must be a non-negative int, got {passes!r}")
    original = blocks.clone() if passes else None
    orthogonalize_(blocks, type_name, direction, scale, layout)
    if not passes:
        return blocks
    unit = direction.detach().float()
    unit = unit / unit.norm()
    component = _along(original, type_name, unit, layout)
    kept, projection = (1 - scale) * component, scale * component
    for _ in range(passes):
        projection = projection + (_along(blocks, type_name, unit, layout) - kept)
        _requantize_(blocks, original, type_name, unit, projection, layout)
    return blocks
