"""Triton kernel for orthogonalize: W <- W - scale * u (u^T W) / (u^T u) per [d_model, d_in] matrix.

Each program owns a strip of BLOCK_N columns of one matrix. It reads the strip once to reduce
c = u^T W in fp32, then reads it again (from L2, since the strip is small) to write W - u c, so
DRAM sees about one read and one write of W and the extra memory is registers only.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._layout import TwoLevelLayout, launch_in_place

# Elements of W a program holds per step of its row loop.
STRIP_TILE = 8192
STRIP_WIDTHS = (128, 64, 32, 16)


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
):
    program = tl.program_id(0).to(tl.int64)
    matrix = program // strips_per_matrix
    w_matrix = w_ptr + (matrix // matrices_inner) * outer_stride + (matrix % matrices_inner) * inner_stride
    cols = (program % strips_per_matrix) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_in
    row_offsets = tl.arange(0, BLOCK_M)

    # Pass 1: [BLOCK_M, BLOCK_N] partial sums of u^T W and of u^T u, collapsed after the loop.
    dot_parts = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    norm_sq_parts = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, d_model, BLOCK_M):
        rows = start + row_offsets
        u, w, mask, ptrs = _load_rows(w_matrix, direction_ptr, rows, cols, d_model, row_stride, col_ok)
        dot_parts += u[:, None] * w
        norm_sq_parts += u * u
    c = tl.sum(dot_parts, axis=0) * (scale / tl.sum(norm_sq_parts, axis=0))

    # Pass 2: W - u c over the same strip.
    for start in range(0, d_model, BLOCK_M):
        rows = start + row_offsets
        u, w, mask, ptrs = _load_rows(w_matrix, direction_ptr, rows, cols, d_model, row_stride, col_ok)
        tl.store(ptrs, (w - u[:, None] * c[None, :]).to(w_ptr.dtype.element_ty), mask=mask)


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


def launch_orthogonalize(weight: torch.Tensor, direction: torch.Tensor, scale: float) -> None:
    """Orthogonalize weight in place; its metadata must already have passed `_ops.check_orthogonalize`.

    Args:
        weight: [..., d_model, d_in] float32, float16 or bfloat16, last-dim stride 1.
        direction: [d_model], any float dtype.
        scale: the multiple of the component to remove.
    """
    if weight.numel() == 0:
        return
    d_model, d_in = weight.shape[-2:]
    num_matrices = weight.numel() // (d_model * d_in)
    direction = direction.contiguous()
    block_n = _strip_width(weight, num_matrices)
    block_m = min(triton.next_power_of_2(d_model), max(1, STRIP_TILE // block_n))
    strips = triton.cdiv(d_in, block_n)

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
            num_warps=8 if block_m * block_n >= 4096 else 4,
        )

    launch_in_place(weight, 2, launch)
