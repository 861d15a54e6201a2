"""What the K-quant references (kquants: Q4_K, Q5_K, Q6_K; kquants_low: Q2_K, Q3_K) share.

llama.cpp's fp32 arithmetic emulated bit for bit (nearest_int, fp32 divisions, running sums),
the packing of their arrays of quants, the input check, make_qkx2_quants and the row-level
quantize and edit around a format's super-block quantizer.

A leaf module of the K-quants: it imports nothing from kquants or kquants_low.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..._checks import check_float
from ._blocks import check_blocks, check_type_name, fp16_values, orthogonalize_blocks_

VALUES_PER_BLOCK = 256
# llama.cpp's GROUP_MAX_EPS: below it a sub-block (or super-block) counts as all zero.
GROUP_MAX_EPS = torch.tensor(1e-15, dtype=torch.float32).item()
# 1.5 * 2**23: adding it leaves round(x) in the low 23 bits of the float (nearest_int).
_ROUNDING_OFFSET = 12582912.0


def check_values(values: torch.Tensor) -> None:
    """values must be finite floats [rows, row_length] with row_length a multiple of 256."""
    check_float(values, "values")
    if values.dim() != 2 or values.shape[1] % VALUES_PER_BLOCK:
        raise ValueError(
            f"values must be 2-D [rows, row_length] with row_length a multiple of {VALUES_PER_BLOCK}, "
            f"got shape {tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values).all()):
        raise ValueError("values must be finite")


# ---- fp32 arithmetic as llama.cpp does it


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int, bit for bit (int32): round to nearest, ties to even, for |x| < 2**22.

    Beyond that range it returns what llama.cpp's does (its assert is compiled out).
    """
    return ((values + _ROUNDING_OFFSET).view(torch.int32) & 0x7FFFFF) - 0x400000


def divided(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator as an fp32 division (a Python scalar over a tensor would take a reciprocal)."""
    return torch.full_like(denominator, numerator) / denominator


def running_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0, term after term (a C loop's fp32 `sum += term`), not a tree reduction."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def positive_part(values: torch.Tensor) -> torch.Tensor:
    """values where > 0, else 0: what a scan `if (v > best) best = v` from 0 sees (NaN never wins)."""
    return torch.where(values > 0, values, 0.0)


def f32(value: float) -> torch.Tensor:
    """A float32 scalar, so that arithmetic on constants rounds as C's float expressions do."""
    return torch.tensor(value, dtype=torch.float32)


# ---- bytes


def fp16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 stored at `offset` of every block, as fp32 [blocks]."""
    return fp16_values(blocks[:, offset : offset + 2]).flatten()


def _field_shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.int32, device=device).reshape(1, 1, -1, 1)


def unpack_fields(packed: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """Bytes [blocks, groups * n] holding 8 / bits fields each -> int32 [blocks, groups * 8 / bits * n].

    Field k of byte g * n + l is value (g * 8 / bits + k) * n + l: every K-quant array of quants,
    masks and (Q3_K's) scales.
    """
    grouped = packed.int().reshape(packed.shape[0], groups, 1, packed.shape[1] // groups)
    return ((grouped >> _field_shifts(bits, packed.device)) & ((1 << bits) - 1)).flatten(1)


def pack_fields(values: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """Inverse of `unpack_fields`: int values [blocks, N], each below 2**bits -> uint8 [blocks, N * bits / 8]."""
    shifts = _field_shifts(bits, values.device)
    fields = shifts.shape[2]
    grouped = values.int().reshape(values.shape[0], groups, fields, values.shape[1] // (groups * fields))
    return (grouped << shifts).sum(2).flatten(1).to(torch.uint8)


# ---- make_qkx2_quants


def _weighted_error(weights: torch.Tensor, fitted: torch.Tensor, x: torch.Tensor, absolute_error: bool) -> torch.Tensor:
    """sum of w |fit - x| (use_mad) or of w (fit - x)^2 over each column, in llama.cpp's order."""
    difference = fitted - x
    return running_sum(weights * (difference.abs() if absolute_error else difference.square()))


def make_qkx2_quants(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    absolute_error: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants on each column of x [n, groups]; use_mad is `absolute_error`.

    Returns (levels int32 [n, groups] in 0..nmax, scale [groups], the_min [groups]) with
    x ~ scale * levels - the_min. As in llama.cpp, each step of the search starts from the
    min of the best fit so far.
    """
    low = x.amin(0)
    low = torch.where(low > 0, 0.0, low)
    high = x.amax(0)
    flat = high == low
    sum_w = running_sum(weights)
    sum_x = running_sum(weights * x)
    inverse = divided(nmax, high - low)
    scale = divided(1.0, inverse)
    levels = nearest_int(inverse * (x - low)).clamp(0, nmax)
    best_error = _weighted_error(weights, scale * levels.float() + low, x, absolute_error)
    for step in range(nstep + 1):
        inverse = divided((f32(rmin) + f32(rdelta) * step + nmax).item(), high - low)
        trial = nearest_int(inverse * (x - low)).clamp(0, nmax)
        trial_float = trial.float()
        weighted = weights * trial_float
        sum_l, sum_l2, sum_xl = running_sum(torch.stack([weighted, weighted * trial_float, weighted * x], 1)).unbind()
        determinant = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = (sum_w * sum_xl - sum_x * sum_l) / determinant
        trial_min = (sum_l2 * sum_x - sum_l * sum_xl) / determinant
        min_above_zero = trial_min > 0
        trial_scale = torch.where(min_above_zero, sum_xl / sum_l2, trial_scale)
        trial_min = torch.where(min_above_zero, 0.0, trial_min)
        error = _weighted_error(weights, trial_scale * trial_float + trial_min, x, absolute_error)
        better = ~flat & (determinant > 0) & (error < best_error)
        levels = torch.where(better, trial, levels)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, trial_scale, scale)
        low = torch.where(better, trial_min, low)
    return torch.where(flat, 0, levels), torch.where(flat, 0.0, scale), -low


# ---- rows around a format's super-block quantizer

# (blocks or values, type name) -> values or blocks: a format's quantize, dequantize or super-block quantizer.
Codec = Callable[[torch.Tensor, str], torch.Tensor]


def quantize_rows(
    values: torch.Tensor, type_name: str, formats: dict[str, tuple[int, int]], quantize_superblocks: Codec
) -> torch.Tensor:
    """Checks, then quantizes fp32 rows [rows, row_length] one super-block [blocks, 256] at a time.

    Returns uint8 blocks [rows, bytes_per_row]; `quantize_superblocks` gets fp32 [blocks, 256].
    """
    check_type_name(type_name, formats)
    check_values(values)
    blocks = quantize_superblocks(values.float().reshape(-1, VALUES_PER_BLOCK), type_name)
    return blocks.reshape(values.shape[0], values.shape[1] // VALUES_PER_BLOCK * formats[type_name][1])


def reference_edit(formats: dict[str, tuple[int, int]], dequantize: Codec, quantize: Codec) -> Callable[..., None]:
    """A format module's orthogonalize_reference_, for the types in `formats`, through its dequantize and quantize."""

    def orthogonalize_reference_(
        blocks: torch.Tensor, type_name: str, direction: torch.Tensor, scale: float = 1.0, layout: str = "matrix"
    ) -> None:
        """Dequantize, orthogonalize in fp32, requantize every super-block; writes `blocks` in place.

        layout "matrix": the rows are d_model outputs of a linear weight [out][in], W <- W - scale d (d^T W);
        layout "rows": each row is a d_model vector (token embeddings), v <- v - scale (v . d) d.
        Every argument is checked before anything is written.
        """
        row_length = check_blocks(blocks, type_name, formats)
        codec = (partial(dequantize, type_name=type_name), partial(quantize, type_name=type_name))
        orthogonalize_blocks_(blocks, row_length, direction, scale, layout, *codec)

    return orthogonalize_reference_
