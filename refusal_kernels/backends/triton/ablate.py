"""Triton kernel for ablate and ablate_indexed: v <- v - scale * (v.u / u.u) u for each vector v.

u is the raw direction; dividing by u.u inside the kernel is the fp32 normalization, so the host
never waits for a norm. One kernel serves both ops: `ablate` is the case where every vector
uses the same direction and none is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import TwoLevelLayout, launch_in_place

# Rows up to this length stay in registers; longer rows are reduced chunk by chunk and then
# read again (from L2) to be updated.
MAX_WHOLE_ROW = 16384
CHUNK = 4096
# Elements per program when short rows are packed several to a program.
ROW_TILE = 4096


@triton.jit
def _load_chunk(x_rows, direction_rows, cols, d, rows_active, direction_active):
    """Columns `cols` of the vectors and of their directions, in fp32, and the mask for storing."""
    in_row = cols < d
    x_mask = rows_active[:, None] & in_row
    v = tl.load(x_rows + cols, mask=x_mask, other=0.0).to(tl.float32)
    u = tl.load(direction_rows + cols, mask=direction_active[:, None] & in_row, other=0.0).to(tl.float32)
    return v, u, x_mask


@triton.jit
def _ablate_kernel(
    x_ptr,
    direction_ptr,
    index_ptr,
    n_rows,
    d,
    rows_inner,
    outer_stride,
    inner_stride,
    num_directions,
    rows_per_index,
    scale,
    INDEXED: tl.constexpr,
    PER_BATCH_ROW: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WHOLE_ROW: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    row_start = (rows // rows_inner) * outer_stride + (rows % rows_inner) * inner_stride
    if INDEXED:
        if PER_BATCH_ROW:
            choice = tl.load(index_ptr + rows // rows_per_index, mask=row_ok, other=-1)
        else:
            choice = tl.load(index_ptr + rows, mask=row_ok, other=-1)
        # -1 skips the vector; other out-of-range entries are skipped too rather than read out of bounds.
        rows_active = row_ok & (choice >= 0) & (choice < num_directions)
        direction_active = rows_active
        direction_start = tl.where(rows_active, choice, 0).to(tl.int64) * d
    else:
        rows_active = row_ok
        # One direction for the whole program: a [1, BLOCK_D] tile broadcast over its rows.
        direction_active = tl.full([1], 1, tl.int1)
        direction_start = tl.zeros([1], tl.int64)
    x_rows = x_ptr + row_start[:, None]
    direction_rows = direction_ptr + direction_start[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]

    if WHOLE_ROW:
        v, u, x_mask = _load_chunk(x_rows, direction_rows, cols, d, rows_active, direction_active)
        norm_sq = tl.where(direction_active, tl.sum(u * u, axis=1), 1.0)
        coef = scale * tl.sum(v * u, axis=1) / norm_sq
        tl.store(x_rows + cols, (v - coef[:, None] * u).to(x_ptr.dtype.element_ty), mask=x_mask)
    else:
        # Reduce in [BLOCK_ROWS, BLOCK_D] partial sums, collapsed once after the loop.
        dot_parts = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
        norm_sq_parts = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
        for start in range(0, d, BLOCK_D):
            v, u, x_mask = _load_chunk(x_rows, direction_rows, start + cols, d, rows_active, direction_active)
            dot_parts += v * u
            norm_sq_parts += u * u
        norm_sq = tl.where(direction_active, tl.sum(norm_sq_parts, axis=1), 1.0)
        coef = scale * tl.sum(dot_parts, axis=1) / norm_sq
        for start in range(0, d, BLOCK_D):
            v, u, x_mask = _load_chunk(x_rows, direction_rows, start + cols, d, rows_active, direction_active)
            tl.store(x_rows + start + cols, (v - coef[:, None] * u).to(x_ptr.dtype.element_ty), mask=x_mask)


def launch_ablate(
    x: torch.Tensor,
    directions: torch.Tensor,
    index: torch.Tensor | None,
    per_batch_row: bool,
    scale: float,
) -> None:
    """Ablate x in place; its metadata must already have passed the `_checks.check_*` check.

    Args:
        x: [..., d] float32, float16 or bfloat16, last-dim stride 1, any leading strides.
        directions: [d] (index None: one direction for all vectors) or [K, d]; any float dtype.
        index: None, or int64 with one entry per vector of x, or one per batch row when
            `per_batch_row`; entries outside [0, K) leave their vectors untouched.
        scale: the multiple of the component to remove.
    """
    if x.numel() == 0:
        return
    d = x.shape[-1]
    n_rows = x.numel() // d
    directions = directions.contiguous()
    if index is not None:
        index = index.contiguous()
    whole_row = d <= MAX_WHOLE_ROW
    block_d = triton.next_power_of_2(d) if whole_row else CHUNK
    block_rows = min(max(1, ROW_TILE // block_d), triton.next_power_of_2(n_rows)) if whole_row else 1
    num_warps = min(16, max(1, block_rows * block_d // 1024))

    def launch(rows: torch.Tensor, layout: TwoLevelLayout) -> None:
        _ablate_kernel[(triton.cdiv(n_rows, block_rows),)](
            rows,
            directions,
            index,
            n_rows,
            d,
            layout.inner,
            layout.outer_stride,
            layout.inner_stride,
            directions.shape[0] if index is not None else 1,
            n_rows // x.shape[0] if per_batch_row else 1,
            scale,
            INDEXED=index is not None,
            PER_BATCH_ROW=per_batch_row,
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
            WHOLE_ROW=whole_row,
            num_warps=num_warps,
        )

    launch_in_place(x, 1, launch)
