"""Triton kernels for orthogonalize on int8, GPTQ int4 and fp8 storage.

Same rules as the C++ CPU kernels (csrc/cpu/orthogonalize_quant.cpp) and the references in
refusal_kernels/quant/: three passes over the quantized storage,
  1. c = d^T W, dequantizing tiles on the fly in fp32;
  2. the range of every group's updated values (absmax, or min and max for int4), read only;
     the fresh scales (and zeros) are then chosen in torch from these O(groups) values with
     the references' own helpers, so that the rules live in one place;
  3. dequantize, update, requantize with the fresh scales and store.
Each pass-3 program owns whole packed words, so no two programs write the same word.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._checks import check_fp8, check_gptq, check_int8, gptq_zero_min
from ...quant import _common, fp8, gptq, int8
from ...reference import unit

TILE_ROWS = 32
TILE_COLS = 64


@triton.jit
def _round_half_even(x):
    rounded = tl.floor(x + 0.5)
    is_odd = (rounded - 2.0 * tl.floor(rounded * 0.5)) != 0.0
    return tl.where(((rounded - x) == 0.5) & is_odd, rounded - 1.0, rounded)


@triton.jit
def _round_to_e4m3(x):
    """x rounded to nearest-even on the e4m3 grid (3 mantissa bits, subnormals below 2^-6), in fp32.

    The cast that follows is then exact, whatever rounding the conversion applies (the
    interpreter's fp32 -> fp8 cast mis-rounds values just below a power of two).
    """
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)
    quantum = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return _round_half_even(x / quantum) * quantum


# ---- int8 per row and fp8 per tensor / row / 128 block: row-major q [rows, cols],
# step[block] with block = (i // block_rows, j // block_cols) on a grid of grid_cols columns.


@triton.jit
def _dequantized_tile(q_ptr, step_ptr, rows_idx, cols_idx, mask, cols, block_rows, block_cols, grid_cols):
    # No `other=` for the masked load: it would have to be cast to fp8.
    q = tl.load(q_ptr + rows_idx[:, None] * cols + cols_idx[None, :], mask=mask).to(tl.float32)
    block = (rows_idx[:, None] // block_rows) * grid_cols + cols_idx[None, :] // block_cols
    return tl.where(mask, q * tl.load(step_ptr + block, mask=mask, other=0.0), 0.0)


@triton.jit
def _block_scaled_column_dot(
    q_ptr, step_ptr, d_ptr, c_ptr, rows, cols, block_rows, block_cols, grid_cols, TR: tl.constexpr, TC: tl.constexpr
):
    cols_idx = tl.program_id(0) * TC + tl.arange(0, TC)
    acc = tl.zeros((TC,), dtype=tl.float32)
    for start in range(0, rows, TR):
        rows_idx = start + tl.arange(0, TR)
        mask = (rows_idx[:, None] < rows) & (cols_idx[None, :] < cols)
        w = _dequantized_tile(q_ptr, step_ptr, rows_idx, cols_idx, mask, cols, block_rows, block_cols, grid_cols)
        d = tl.load(d_ptr + rows_idx, mask=rows_idx < rows, other=0.0)
        acc += tl.sum(w * d[:, None], axis=0)
    tl.store(c_ptr + cols_idx, acc, mask=cols_idx < cols)


@triton.jit
def _block_scaled_update(
    q_ptr,
    step_ptr,
    new_step_ptr,
    tile_absmax_ptr,
    d_ptr,
    c_ptr,
    s,
    rows,
    cols,
    block_rows,
    block_cols,
    grid_cols,
    QMAX: tl.constexpr,
    IS_FP8: tl.constexpr,
    WRITE: tl.constexpr,
    TR: tl.constexpr,
    TC: tl.constexpr,
):
    rows_idx = tl.program_id(0) * TR + tl.arange(0, TR)
    cols_idx = tl.program_id(1) * TC + tl.arange(0, TC)
    mask = (rows_idx[:, None] < rows) & (cols_idx[None, :] < cols)
    w = _dequantized_tile(q_ptr, step_ptr, rows_idx, cols_idx, mask, cols, block_rows, block_cols, grid_cols)
    d = tl.load(d_ptr + rows_idx, mask=rows_idx < rows, other=0.0)
    c = tl.load(c_ptr + cols_idx, mask=cols_idx < cols, other=0.0)
    w = w - (s * d)[:, None] * c[None, :]
    if WRITE:
        block = (rows_idx[:, None] // block_rows) * grid_cols + cols_idx[None, :] // block_cols
        x = w / tl.load(new_step_ptr + block, mask=mask, other=1.0)
        x = tl.minimum(tl.maximum(x, -QMAX), QMAX)
        offsets = rows_idx[:, None] * cols + cols_idx[None, :]
        if IS_FP8:
            tl.store(q_ptr + offsets, _round_to_e4m3(x).to(tl.float8e4nv), mask=mask)
        else:
            tl.store(q_ptr + offsets, _round_half_even(x).to(tl.int8), mask=mask)
    else:
        absmax = tl.max(tl.max(tl.where(mask, tl.abs(w), 0.0), axis=1), axis=0)
        tl.store(tile_absmax_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), absmax)


def _orthogonalize_block_scaled(q, stored_scale, block, divisor, qmax, direction, scale) -> torch.Tensor:
    """Runs the passes; returns the fresh per-block steps (W = q * step), [grid_rows, grid_cols] fp32."""
    rows, cols = q.shape
    block_rows, block_cols = block
    grid_rows, grid_cols = triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols)
    d = unit(direction).contiguous()
    step = (stored_scale.float() / divisor).reshape(-1).contiguous()
    c = torch.empty(cols, dtype=torch.float32, device=q.device)
    dims = (rows, cols, block_rows, block_cols, grid_cols)
    _block_scaled_column_dot[(triton.cdiv(cols, TILE_COLS),)](q, step, d, c, *dims, TR=TILE_ROWS, TC=TILE_COLS)
    # Tiles never straddle two blocks: blocks are 1 row, 128 rows, or the whole matrix.
    tile_rows = 1 if block_rows == 1 else TILE_ROWS
    grid = (triton.cdiv(rows, tile_rows), triton.cdiv(cols, TILE_COLS))
    tile_absmax = torch.empty(grid, dtype=torch.float32, device=q.device)
    args = (q, step, step, tile_absmax, d, c, float(scale), *dims)
    _block_scaled_update[grid](*args, QMAX=qmax, IS_FP8=q.dtype != torch.int8, WRITE=False, TR=tile_rows, TC=TILE_COLS)
    tile_row_block = torch.arange(grid[0], device=q.device) * tile_rows // block_rows
    tile_col_block = torch.arange(grid[1], device=q.device) * TILE_COLS // block_cols
    tile_block = tile_row_block[:, None] * grid_cols + tile_col_block[None, :]
    absmax = torch.zeros(grid_rows * grid_cols, device=q.device).scatter_reduce(
        0, tile_block.reshape(-1), tile_absmax.reshape(-1), "amax"
    )
    new_step = _common.symmetric_scale(absmax, qmax, stored_scale.dtype).float()
    args = (q, step, new_step, tile_absmax, d, c, float(scale), *dims)
    _block_scaled_update[grid](*args, QMAX=qmax, IS_FP8=q.dtype != torch.int8, WRITE=True, TR=tile_rows, TC=TILE_COLS)
    return new_step


def orthogonalize_int8_(qweight, row_scale, direction, scale=1.0, absmax_scale=False) -> None:
    """Triton refusal::orthogonalize_int8 (layout: refusal_kernels.quant.int8)."""
    check_int8(qweight, row_scale, direction, scale)
    divisor = int8.QMAX if absmax_scale else 1.0
    step = _orthogonalize_block_scaled(qweight, row_scale, (1, qweight.shape[1]), divisor, int8.QMAX, direction, scale)
    row_scale.copy_(_common.round_up_to_dtype(step * divisor, row_scale.dtype).reshape(row_scale.shape))


def orthogonalize_fp8_(weight, weight_scale, direction, scale=1.0) -> None:
    """Triton refusal::orthogonalize_fp8 (layout: refusal_kernels.quant.fp8)."""
    block = check_fp8(weight, weight_scale, direction, scale)
    step = _orthogonalize_block_scaled(weight, weight_scale, block, 1.0, fp8.FP8_MAX, direction, scale)
    weight_scale.copy_(step.reshape(weight_scale.shape))


# ---- GPTQ int4: qweight [in / 8, out]; zeros and scales decoded into [groups, out] fp32.


@triton.jit
def _gptq_dequantized_tile(qweight_ptr, step_ptr, zero_ptr, group_ptr, i, j, mask, out):
    """fp32 W[i, j] for outputs i x inputs j (j must be in range; masked lanes read 0)."""
    words = tl.load(qweight_ptr + (j[None, :] // 8) * out + i[:, None], mask=mask, other=0)
    values = ((words >> ((j[None, :] % 8) * 4)) & 0xF).to(tl.float32)
    index = tl.load(group_ptr + j)[None, :] * out + i[:, None]
    return (values - tl.load(zero_ptr + index, mask=mask, other=0.0)) * tl.load(step_ptr + index, mask=mask, other=0.0)


@triton.jit
def _gptq_column_dot(
    qweight_ptr, step_ptr, zero_ptr, group_ptr, d_ptr, c_ptr, out, in_features, TI: tl.constexpr, TJ: tl.constexpr
):
    j = tl.program_id(0) * TJ + tl.arange(0, TJ)
    j_in_range = tl.minimum(j, in_features - 1)
    acc = tl.zeros((TJ,), dtype=tl.float32)
    for start in range(0, out, TI):
        i = start + tl.arange(0, TI)
        mask = (i[:, None] < out) & (j[None, :] < in_features)
        w = _gptq_dequantized_tile(qweight_ptr, step_ptr, zero_ptr, group_ptr, i, j_in_range, mask, out)
        acc += tl.sum(w * tl.load(d_ptr + i, mask=i < out, other=0.0)[:, None], axis=0)
    tl.store(c_ptr + j, acc, mask=j < in_features)


@triton.jit
def _gptq_group_range(
    qweight_ptr,
    step_ptr,
    zero_ptr,
    group_ptr,
    members_ptr,
    group_start_ptr,
    d_ptr,
    c_ptr,
    low_ptr,
    high_ptr,
    s,
    out,
    TI: tl.constexpr,
    TJ: tl.constexpr,
):
    """min and max (with 0) of the updated values of group program_id(0), outputs in tile program_id(1)."""
    g = tl.program_id(0)
    i = tl.program_id(1) * TI + tl.arange(0, TI)
    d = tl.load(d_ptr + i, mask=i < out, other=0.0)
    first = tl.load(group_start_ptr + g)
    last = tl.load(group_start_ptr + g + 1)
    low = tl.zeros((TI,), dtype=tl.float32)
    high = tl.zeros((TI,), dtype=tl.float32)
    for start in range(first, last, TJ):
        m = start + tl.arange(0, TJ)
        j = tl.load(members_ptr + tl.minimum(m, last - 1))
        mask = (i[:, None] < out) & (m[None, :] < last)
        w = _gptq_dequantized_tile(qweight_ptr, step_ptr, zero_ptr, group_ptr, i, j, mask, out)
        w = tl.where(mask, w - (s * d)[:, None] * tl.load(c_ptr + j)[None, :], 0.0)
        low = tl.minimum(low, tl.min(w, axis=1))
        high = tl.maximum(high, tl.max(w, axis=1))
    tl.store(low_ptr + g * out + i, low, mask=i < out)
    tl.store(high_ptr + g * out + i, high, mask=i < out)


@triton.jit
def _gptq_requantize(
    qweight_ptr,
    step_ptr,
    zero_ptr,
    new_step_ptr,
    new_zero_ptr,
    group_ptr,
    d_ptr,
    c_ptr,
    s,
    out,
    TI: tl.constexpr,
):
    """Rewrites the words of packed row program_id(0) (inputs 8p .. 8p + 7), outputs in tile program_id(1)."""
    p = tl.program_id(0)
    i = tl.program_id(1) * TI + tl.arange(0, TI)
    in_range = i < out
    d = tl.load(d_ptr + i, mask=in_range, other=0.0)
    words = tl.load(qweight_ptr + p * out + i, mask=in_range, other=0)
    packed = tl.zeros((TI,), dtype=tl.int32)
    for k in tl.static_range(8):
        j = p * 8 + k
        index = tl.load(group_ptr + j) * out + i
        value = ((words >> (4 * k)) & 0xF).to(tl.float32)
        old = (value - tl.load(zero_ptr + index, mask=in_range, other=0.0)) * tl.load(
            step_ptr + index, mask=in_range, other=1.0
        )
        w = old - s * d * tl.load(c_ptr + j)
        level = _round_half_even(w / tl.load(new_step_ptr + index, mask=in_range, other=1.0))
        level = level + tl.load(new_zero_ptr + index, mask=in_range, other=0.0)
        level = tl.minimum(tl.maximum(level, 0.0), 15.0).to(tl.int32)
        packed = packed | (level << (4 * k))
    tl.store(qweight_ptr + p * out + i, packed, mask=in_range)


def orthogonalize_gptq_(qweight, qzeros, scales, g_idx, direction, group_size, scale=1.0, zeros_format="v1") -> None:
    """Triton refusal::orthogonalize_gptq (layout: refusal_kernels.quant.gptq)."""
    check_gptq(qweight, qzeros, scales, g_idx, direction, group_size, scale, zeros_format)
    packed_rows, out = qweight.shape
    in_features, groups = 8 * packed_rows, scales.shape[0]
    device = qweight.device
    group = gptq.group_of_column(in_features, group_size, None if g_idx is None else g_idx.cpu()).to(device)
    members = torch.argsort(group, stable=True)
    group_start = torch.zeros(groups + 1, dtype=torch.int64, device=device)
    group_start[1:] = torch.bincount(group, minlength=groups).cumsum(0)
    d = unit(direction).contiguous()
    step = scales.float().contiguous()
    zero = gptq.unpack_zeros(qzeros, zeros_format).float()
    storage = (qweight, step, zero, group)
    c = torch.empty(in_features, dtype=torch.float32, device=device)
    _gptq_column_dot[(triton.cdiv(in_features, TILE_COLS),)](
        *storage, d, c, out, in_features, TI=TILE_ROWS, TJ=TILE_COLS
    )
    low = torch.empty(groups, out, dtype=torch.float32, device=device)
    high = torch.empty_like(low)
    _gptq_group_range[(groups, triton.cdiv(out, TILE_COLS))](
        *storage, members, group_start, d, c, low, high, float(scale), out, TI=TILE_COLS, TJ=TILE_ROWS
    )
    new_step, new_zero = _common.asymmetric_int4_scale_zero(low, high, gptq_zero_min(zeros_format), scales.dtype)
    _gptq_requantize[(packed_rows, triton.cdiv(out, TILE_COLS))](
        qweight, step, zero, new_step.float(), new_zero.float(), group, d, c, float(scale), out, TI=TILE_COLS
    )
    scales.copy_(new_step)
    qzeros.copy_(gptq.pack_zeros(new_zero, zeros_format))
