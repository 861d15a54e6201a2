"""Triton kernels for orthogonalize: W <- W - scale * u (u^T W) / (u^T u) per [d_model, d_in] matrix,
and for its norm-preserving variants.

Each program owns a strip of BLOCK_N columns of one matrix. It reads the strip once to reduce
c = u^T W in fp32, then reads it again (from L2, since the strip is small) to write W - u c, so
DRAM sees about one read and one write of W and the extra memory is registers only. Keeping
column norms adds the squared column norms to the same reduction.

Keeping row norms (the row-normalized form) needs whole rows, so it takes three kernels: one
program per row for the row norms, column strips for c = d^T W_n (W_n: the row-normalized W)
into an fp32 buffer, and one program per row that finds the row's updated norm and rescales it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ... import reference
from ._layout import TwoLevelLayout, launch_in_place

# Elements of W a program holds per step of its row loop.
STRIP_TILE = 8192
STRIP_WIDTHS = (128, 64, 32, 16)
# Elements of a row a row program holds per step.
ROW_CHUNK = 4096
# A vector whose squared norm the update brings to this fraction of its old one or below
# becomes zero (csrc/norm_preserving.h says why).
EMPTIED_FRACTION = tl.constexpr(reference.EMPTIED_FRACTION)


@triton.jit
def _matrix_start(w_ptr, matrix, matrices_inner, outer_stride, inner_stride):
    return w_ptr + (matrix // matrices_inner) * outer_stride + (matrix % matrices_inner) * inner_stride


@triton.jit
def _program_strip(w_ptr, d_in, strips_per_matrix, matrices_inner, outer_stride, inner_stride, BLOCK_N: tl.constexpr):
    """This program's matrix, the matrix's start, and its strip of BLOCK_N columns (with their mask)."""
    program = tl.program_id(0).to(tl.int64)
    matrix = program // strips_per_matrix
    w_matrix = _matrix_start(w_ptr, matrix, matrices_inner, outer_stride, inner_stride)
    cols = (program % strips_per_matrix) * BLOCK_N + tl.arange(0, BLOCK_N)
    return matrix, w_matrix, cols, cols < d_in


@triton.jit
def _orthogonalize_kernel(
    w_ptr,
    direction_ptr,
    d_model,
    d_in,
    row_stride,
    strips_per_matrix,
    matrices_inner,
    outer_stride,
    inner_stride,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRESERVE_COLUMN_NORMS: tl.constexpr,
):
    _, w_matrix, cols, col_ok = _program_strip(
        w_ptr, d_in, strips_per_matrix, matrices_inner, outer_stride, inner_stride, BLOCK_N
    )
    row_offsets = tl.arange(0, BLOCK_M)

    # Pass 1: [BLOCK_M, BLOCK_N] partial sums of u^T W, of u^T u and, to keep column norms, of
    # the squared columns, collapsed after the loop.
    dot_parts = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    square_parts = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    norm_sq_parts = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, d_model, BLOCK_M):
        rows = start + row_offsets
        u, w, mask, ptrs = _load_rows(w_matrix, direction_ptr, rows, cols, d_model, row_stride, col_ok)
        dot_parts += u[:, None] * w
        norm_sq_parts += u * u
        if PRESERVE_COLUMN_NORMS:
            square_parts += w * w
    dots = tl.sum(dot_parts, axis=0)
    u_norm_sq = tl.sum(norm_sq_parts, axis=0)
    c = dots * (scale / u_norm_sq)
    if PRESERVE_COLUMN_NORMS:
        # (u^T w)^2 / (u^T u) is the squared component along the unit direction.
        factor = _column_norm_factor(tl.sum(square_parts, axis=0), dots * dots / u_norm_sq, scale)
        c = c * factor

    # Pass 2: W - u c (factor * W - u c to keep column norms) over the same strip.
    for start in range(0, d_model, BLOCK_M):
        rows = start + row_offsets
        u, w, mask, ptrs = _load_rows(w_matrix, direction_ptr, rows, cols, d_model, row_stride, col_ok)
        if PRESERVE_COLUMN_NORMS:
            w = w * factor[None, :]
        tl.store(ptrs, (w - u[:, None] * c[None, :]).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_norm_factor(norm_sq, component_sq, scale):
    """||w|| / ||w - scale c d|| with c^2 = component_sq, 0 for a zero column or one the update empties.

    ||w - scale c d||^2 = ||w||^2 - (2 scale - scale^2) c^2, as in csrc/norm_preserving.h.
    """
    updated_sq = norm_sq - (2 * scale - scale * scale) * component_sq
    emptied = updated_sq <= norm_sq * EMPTIED_FRACTION
    return tl.where(emptied, 0.0, tl.sqrt(norm_sq / tl.where(emptied, 1.0, updated_sq)))


@triton.jit
def _row_norms_kernel(
    w_ptr,
    unit_ptr,
    norms_ptr,
    weights_ptr,
    d_model,
    d_in,
    row_stride,
    matrices_inner,
    outer_stride,
    inner_stride,
    BLOCK_N: tl.constexpr,
):
    """The norm r of each row (flat over the matrices) and its weight d[i] / r in d^T W_n (0 for a zero row)."""
    row = tl.program_id(0).to(tl.int64)
    w_row = (
        _matrix_start(w_ptr, row // d_model, matrices_inner, outer_stride, inner_stride) + (row % d_model) * row_stride
    )
    cols = tl.arange(0, BLOCK_N)
    square_parts = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, d_in, BLOCK_N):
        w = tl.load(w_row + start + cols, mask=start + cols < d_in, other=0.0).to(tl.float32)
        square_parts += w * w
    r = tl.sqrt(tl.sum(square_parts, axis=0))
    d_i = tl.load(unit_ptr + row % d_model)
    tl.store(norms_ptr + row, r)
    tl.store(weights_ptr + row, tl.where(r > 0, d_i / tl.where(r > 0, r, 1.0), 0.0))


@triton.jit
def _weighted_column_sums_kernel(
    w_ptr,
    weights_ptr,
    sums_ptr,
    d_model,
    d_in,
    row_stride,
    strips_per_matrix,
    matrices_inner,
    outer_stride,
    inner_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """sums[matrix, strip] = sum over i of weights[matrix, i] * W[i, strip], in fp32."""
    matrix, w_matrix, cols, col_ok = _program_strip(
        w_ptr, d_in, strips_per_matrix, matrices_inner, outer_stride, inner_stride, BLOCK_N
    )
    dot_parts = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, d_model, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_weight, w, _, _ = _load_rows(
            w_matrix, weights_ptr + matrix * d_model, rows, cols, d_model, row_stride, col_ok
        )
        dot_parts += row_weight[:, None] * w
    tl.store(sums_ptr + matrix * d_in + cols, tl.sum(dot_parts, axis=0), mask=col_ok)


@triton.jit
def _rescale_rows_kernel(
    w_ptr,
    unit_ptr,
    norms_ptr,
    sums_ptr,
    d_model,
    d_in,
    row_stride,
    matrices_inner,
    outer_stride,
    inner_stride,
    scale,
    BLOCK_N: tl.constexpr,
):
    """W[i] <- r normalize(W[i] / r - scale d[i] c) with c = sums[matrix], as in csrc/norm_preserving.h."""
    row = tl.program_id(0).to(tl.int64)
    matrix = row // d_model
    w_row = _matrix_start(w_ptr, matrix, matrices_inner, outer_stride, inner_stride) + (row % d_model) * row_stride
    c_row = sums_ptr + matrix * d_in
    cols = tl.arange(0, BLOCK_N)
    dot_parts = tl.zeros([BLOCK_N], tl.float32)
    c_square_parts = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, d_in, BLOCK_N):
        mask = start + cols < d_in
        w = tl.load(w_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c_row + start + cols, mask=mask, other=0.0)
        dot_parts += w * c
        c_square_parts += c * c
    r = tl.load(norms_ptr + row)
    sd = scale * tl.load(unit_ptr + row % d_model)
    # ||W[i] / r - scale d[i] c||^2, expanded; zero rows and rows the update empties become 0.
    updated_sq = (
        1.0 - 2.0 * sd * tl.sum(dot_parts, axis=0) / tl.where(r > 0, r, 1.0) + sd * sd * tl.sum(c_square_parts, axis=0)
    )
    kept = (r > 0) & (updated_sq > EMPTIED_FRACTION)
    keep = tl.where(kept, 1.0 / tl.sqrt(tl.where(kept, updated_sq, 1.0)), 0.0)
    subtract = sd * r * keep
    for start in range(0, d_in, BLOCK_N):
        mask = start + cols < d_in
        w = tl.load(w_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c_row + start + cols, mask=mask, other=0.0)
        tl.store(w_row + start + cols, (keep * w - subtract * c).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_rows(w_matrix, direction_ptr, rows, cols, d_model, row_stride, col_ok):
    """u[rows] and W[rows, cols] in fp32, with the mask and pointers for storing W back."""
    row_ok = rows < d_model
    u = tl.load(direction_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    mask = row_ok[:, None] & col_ok[None, :]
    ptrs = w_matrix + rows[:, None].to(tl.int64) * row_stride + cols[None, :]
    w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return u, w, mask, ptrs


@functools.lru_cache
def _device_properties(device: torch.device):
    return torch.cuda.get_device_properties(device)


def _strip_width(weight: torch.Tensor, num_matrices: int) -> int:
    """The widest strip that still gives every SM two programs and keeps their strips in L2."""
    d_model, d_in = weight.shape[-2:]
    if weight.device.type != "cuda":
        # The CPU interpreter runs programs one after another: fewer, wider ones are faster.
        return min(STRIP_WIDTHS[0], triton.next_power_of_2(d_in))
    props = _device_properties(weight.device)
    resident_programs = 2 * props.multi_processor_count
    for width in STRIP_WIDTHS:
        enough_programs = triton.cdiv(d_in, width) * num_matrices >= resident_programs
        strips_fit_l2 = resident_programs * d_model * width * weight.element_size() <= props.L2_cache_size
        if enough_programs and strips_fit_l2:
            return width
    return STRIP_WIDTHS[-1]


def _strip_plan(weight: torch.Tensor, num_matrices: int) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, the number of column strips per matrix and the warps per program."""
    d_model, d_in = weight.shape[-2:]
    block_n = _strip_width(weight, num_matrices)
    block_m = min(triton.next_power_of_2(d_model), max(1, STRIP_TILE // block_n))
    return block_m, block_n, triton.cdiv(d_in, block_n), 8 if block_m * block_n >= 4096 else 4


def launch_orthogonalize(
    weight: torch.Tensor, direction: torch.Tensor, scale: float, preserve_column_norms: bool = False
) -> None:
    """Orthogonalize weight in place; its metadata must already have passed `_checks.check_orthogonalize`.

    Args:
        weight: [..., d_model, d_in] float32, float16 or bfloat16, last-dim stride 1.
        direction: [d_model], any float dtype.
        scale: the multiple of the component to remove.
        preserve_column_norms: scale each updated column back to its norm (0 stays 0).
    """
    if weight.numel() == 0:
        return
    d_model, d_in = weight.shape[-2:]
    num_matrices = weight.numel() // (d_model * d_in)
    direction = direction.contiguous()
    block_m, block_n, strips, num_warps = _strip_plan(weight, num_matrices)

    def launch(matrices: torch.Tensor, layout: TwoLevelLayout) -> None:
        _orthogonalize_kernel[(strips * num_matrices,)](
            matrices,
            direction,
            d_model,
            d_in,
            matrices.stride(-2),
            strips,
            layout.inner,
            layout.outer_stride,
            layout.inner_stride,
            scale,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            PRESERVE_COLUMN_NORMS=preserve_column_norms,
            num_warps=num_warps,
        )

    launch_in_place(weight, 2, launch)


def launch_orthogonalize_preserving_row_norms(weight: torch.Tensor, direction: torch.Tensor, scale: float) -> None:
    """The row-normalized form in place: each row divided by its norm, orthogonalized, scaled back.

    Same arguments as `launch_orthogonalize`. Extra memory: fp32 [matrices, d_model] norms and
    row weights, and [matrices, d_in] column sums.
    """
    if weight.numel() == 0:
        return
    d_model, d_in = weight.shape[-2:]
    num_matrices = weight.numel() // (d_model * d_in)
    num_rows = num_matrices * d_model
    unit = reference.unit(direction).contiguous()
    norms = torch.empty(num_rows, device=weight.device, dtype=torch.float32)
    row_weights = torch.empty_like(norms)
    column_sums = torch.empty(num_matrices, d_in, device=weight.device, dtype=torch.float32)
    block_m, block_n, strips, strip_warps = _strip_plan(weight, num_matrices)
    row_chunk = min(triton.next_power_of_2(d_in), ROW_CHUNK)
    row_warps = 8 if row_chunk >= 2048 else 4

    def launch(matrices: torch.Tensor, layout: TwoLevelLayout) -> None:
        shape = (d_model, d_in, matrices.stride(-2))
        addressing = (layout.inner, layout.outer_stride, layout.inner_stride)
        _row_norms_kernel[(num_rows,)](
            matrices, unit, norms, row_weights, *shape, *addressing, BLOCK_N=row_chunk, num_warps=row_warps
        )
        _weighted_column_sums_kernel[(strips * num_matrices,)](
            matrices,
            row_weights,
            column_sums,
            *shape,
            strips,
            *addressing,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=strip_warps,
        )
        _rescale_rows_kernel[(num_rows,)](
            matrices, unit, norms, column_sums, *shape, *addressing, scale, BLOCK_N=row_chunk, num_warps=row_warps
        )

    launch_in_place(weight, 2, launch)
