"""llama.cpp's low-bit K-quant formats Q2_K and Q3_K: layouts and pure-torch references.

A row of a GGUF tensor is a run of super-blocks of 256 values, each stored as one C struct
of ggml-common.h (block_q2_K, block_q3_K), little-endian and without padding. Byte offsets
below are within one super-block; value i is the i-th of its 256 values. Both formats have
16 sub-blocks of 16 values, and both store their 2-bit quants as Q6_K stores its high bits:
bits 2t and 2t + 1 of byte 32h + l are those of value 128h + 32t + l (h = 0, 1, t = 0..3).

Q2_K, 84 bytes:
    0..15    scales  byte j: the 4-bit scale sc_j in its low nibble, the 4-bit min m_j in its high one
    16..79   qs      2-bit quants q_i in 0..3
    80..81   d       fp16, the scale of the sub-block scales
    82..83   dmin    fp16, the scale of the sub-block mins
    value i = (d * sc_j) * q_i - dmin * m_j, with j = i // 16

Q3_K, 110 bytes: 16 6-bit scale codes s_j in 0..63.
    0..31    hmask   the third bit of each quant: bit b of byte l is that of value 32b + l
    32..95   qs      the low 2 bits of each quant
    96..107  scales  for j < 8, the low 4 bits of s_j are the low nibble of byte j, those of
                     s_{j+8} its high nibble; bits 2k and 2k + 1 of byte 8 + l are the high
                     2 bits of s_{4k+l} (k, l = 0..3)
    108..109 d       fp16
    value i = (d * (s_j - 32)) * (q_i - 4), with j = i // 16 and q_i = low | third bit << 2 in 0..7

All arithmetic is fp32, in the order the parentheses show (llama.cpp's dequantize_row_q*_K).

`quantize` follows llama.cpp's reference quantizers, those used without an importance matrix:
  Q2_K  quantize_row_q2_K_ref: per sub-block, make_qkx2_quants(nmax 3, weights |x|, rmin -0.5,
        rdelta 0.1, nstep 15, absolute error), then the scales and mins rounded to 4 bits
        against the super-block's largest ones (q4scale 15);
  Q3_K  quantize_row_q3_K_ref: per sub-block, make_q3_quants(nmax 4, rmse), then the signed
        scales rounded to 6 bits with iscale = -32 / the scale of largest magnitude.
Each then requantizes every value on its sub-block's stored grid. Each loop is kept, with fp32
sums accumulated in llama.cpp's order and nearest_int's rounding (ties to even, through
1.5 * 2**23) emulated bit for bit, vectorized over blocks. That arithmetic, the packing,
make_qkx2_quants and the edit are shared with kquants (Q4_K, Q5_K, Q6_K) through _kquant_common.
"""

from __future__ import annotations

import torch

from . import _kquant_common as common
from ._blocks import check_blocks, fp16_bytes

VALUES_PER_BLOCK = common.VALUES_PER_BLOCK
SUB_BLOCK_VALUES = 16
FORMATS = {"Q2_K": (VALUES_PER_BLOCK, 84), "Q3_K": (VALUES_PER_BLOCK, 110)}

# quantize_row_q2_K_ref's make_qkx2_quants(nmax, rmin, rdelta, nstep) and its q4scale.
_Q2_SEARCH = (3, -0.5, 0.1, 15)
_Q2_SCALE_MAX = 15.0
# make_q3_quants' nmax and tries, and quantize_row_q3_K_ref's scale range -32..31.
_Q3_NMAX = 4
_Q3_TRIES = 5
_Q3_SCALE_NMAX = 32


# ---- fp32 arithmetic as llama.cpp does it


def _quotient(numerator: torch.Tensor, denominator: float) -> torch.Tensor:
    """numerator / denominator as an fp32 division (CUDA multiplies by the reciprocal of a scalar divisor)."""
    return numerator / torch.full_like(numerator, denominator)


def _as_int8(values: torch.Tensor) -> torch.Tensor:
    """int32 values stored in a C int8_t (two's complement wrap)."""
    return ((values + 128) & 0xFF) - 128


# ---- bytes


def _unpack_q3_scales(packed: torch.Tensor) -> torch.Tensor:
    """The 12 scale bytes of Q3_K [blocks, 12] -> the 6-bit codes s_j, int32 [blocks, 16] in 0..63."""
    return common.unpack_fields(packed[:, :8], 1, 4) | common.unpack_fields(packed[:, 8:], 1, 2) << 4


def _pack_q3_scales(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `_unpack_q3_scales`."""
    return torch.cat([common.pack_fields(codes & 0xF, 1, 4), common.pack_fields(codes >> 4, 1, 2)], dim=1)


def _sub_blocks(values: torch.Tensor) -> torch.Tensor:
    """[blocks, 256] -> [blocks, 16, 16], one row per sub-block."""
    return values.reshape(-1, VALUES_PER_BLOCK // SUB_BLOCK_VALUES, SUB_BLOCK_VALUES)


# ---- dequantize


def _dequantize_q2(blocks: torch.Tensor) -> torch.Tensor:
    """Q2_K super-blocks [blocks, 84] -> fp32 [blocks, 256]."""
    codes = blocks[:, :16].int()
    step = common.fp16_at(blocks, 80)[:, None] * (codes & 0xF).float()
    offset = common.fp16_at(blocks, 82)[:, None] * (codes >> 4).float()
    quants = _sub_blocks(common.unpack_fields(blocks[:, 16:80], 2, 2)).float()
    return (step[..., None] * quants - offset[..., None]).reshape(-1, VALUES_PER_BLOCK)


def _dequantize_q3(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K super-blocks [blocks, 110] -> fp32 [blocks, 256]."""
    quants = (common.unpack_fields(blocks[:, 32:96], 2, 2) | common.unpack_fields(blocks[:, :32], 1, 1) << 2) - _Q3_NMAX
    step = common.fp16_at(blocks, 108)[:, None] * (_unpack_q3_scales(blocks[:, 96:108]) - _Q3_SCALE_NMAX).float()
    return (step[..., None] * _sub_blocks(quants).float()).reshape(-1, VALUES_PER_BLOCK)


def dequantize(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """uint8 blocks [rows, bytes_per_row] of `type_name` -> fp32 [rows, row_length] (llama.cpp's values)."""
    row_length = check_blocks(blocks, type_name, FORMATS)
    superblocks = blocks.reshape(-1, FORMATS[type_name][1])
    values = _dequantize_q2(superblocks) if type_name == "Q2_K" else _dequantize_q3(superblocks)
    return values.reshape(blocks.shape[0], row_length)


# ---- quantize: Q2_K


def _four_bit_codes(values: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """nearest_int(15 / largest * value), 0 where largest is 0, as the int llama.cpp computes (not yet stored)."""
    inverse = torch.where(largest > 0, common.divided(_Q2_SCALE_MAX, largest), 0.0)
    return common.nearest_int(inverse[:, None] * values)


def _quantize_q2(superblocks: torch.Tensor) -> torch.Tensor:
    """fp32 [blocks, 256] -> Q2_K super-blocks (quantize_row_q2_K_ref)."""
    # Sub-blocks as columns [16, sub-blocks]: the running sums then step along contiguous rows.
    x = superblocks.reshape(-1, SUB_BLOCK_VALUES).T.contiguous()
    levels, scales, mins = common.make_qkx2_quants(x, x.abs(), *_Q2_SEARCH, absolute_error=True)
    levels, scales, mins = _sub_blocks(levels.T), scales.reshape(-1, 16), mins.reshape(-1, 16)
    largest_scale, largest_min = common.positive_part(scales).amax(1), common.positive_part(mins).amax(1)
    # The scale byte takes the scale's int, then ORs in the min's shifted by 4; C keeps the low 8 bits.
    codes = (_four_bit_codes(scales, largest_scale) | _four_bit_codes(mins, largest_min) << 4) & 0xFF
    d = fp16_bytes(_quotient(largest_scale, _Q2_SCALE_MAX)[:, None])
    dmin = fp16_bytes(_quotient(largest_min, _Q2_SCALE_MAX)[:, None])
    step = d.view(torch.float16).float() * (codes & 0xF).float()
    offset = dmin.view(torch.float16).float() * (codes >> 4).float()
    x = _sub_blocks(superblocks)
    requantized = common.nearest_int((x + offset[..., None]) / step[..., None]).clamp(0, _Q2_SEARCH[0])
    # A sub-block whose step is zero keeps the levels of its own fit, as in llama.cpp.
    levels = torch.where(step[..., None] != 0, requantized, levels).reshape(-1, VALUES_PER_BLOCK)
    return torch.cat([codes.to(torch.uint8), common.pack_fields(levels, 2, 2), d, dmin], dim=1)


# ---- quantize: Q3_K


def _q3_sweep(
    x: torch.Tensor, levels: torch.Tensor, sum_lx: torch.Tensor, sum_l2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One try of make_q3_quants' coordinate descent over the rows of x [n, groups], updating `levels` in place.

    Each value in turn moves to the level that fits the others' least squares scale, if that
    lowers the weighted error; returns the new (sum of w x l, sum of w l^2), w = x^2.
    """
    for i in range(x.shape[0]):
        value, level = x[i], levels[i].float()
        weight = value * value
        weighted = weight * value
        rest_lx = sum_lx - weighted * level
        rest_l2 = sum_l2 - weight * level * level
        candidate = common.nearest_int(value * rest_l2 / rest_lx).clamp(-_Q3_NMAX, _Q3_NMAX - 1)
        candidate_float = candidate.float()
        trial_lx = rest_lx + weighted * candidate_float
        trial_l2 = rest_l2 + weight * candidate_float * candidate_float
        better = trial_lx * trial_lx * sum_l2 > sum_lx * sum_lx * trial_l2
        accept = (rest_lx > 0) & (candidate != levels[i]) & (trial_l2 > 0) & better
        levels[i] = torch.where(accept, candidate, levels[i])
        sum_lx = torch.where(accept, trial_lx, sum_lx)
        sum_l2 = torch.where(accept, trial_l2, sum_l2)
    return sum_lx, sum_l2


def _make_q3_quants(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_q3_quants(n, 4, x, L, do_rmse=true) on each column of x [n, groups].

    Returns (levels int32 [n, groups] in 0..7, offset by 4 as llama.cpp's L, scale [groups]).
    """
    magnitude, first_largest = x.abs().max(0)
    largest = x.gather(0, first_largest[None]).flatten()
    levels = common.nearest_int(common.divided(-_Q3_NMAX, largest) * x).clamp(-_Q3_NMAX, _Q3_NMAX - 1)
    levels_float = levels.float()
    weights = x * x
    sum_lx = common.running_sum(weights * x * levels_float)
    sum_l2 = common.running_sum(weights * levels_float * levels_float)
    # llama.cpp stops after a try that changes nothing; a further try would change nothing either.
    for _ in range(_Q3_TRIES):
        sum_lx, sum_l2 = _q3_sweep(x, levels, sum_lx, sum_l2)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, 0.0)
    all_zero = magnitude < common.GROUP_MAX_EPS
    return torch.where(all_zero, 0, levels + _Q3_NMAX), torch.where(all_zero, 0.0, scale)


def _quantize_q3(superblocks: torch.Tensor) -> torch.Tensor:
    """fp32 [blocks, 256] -> Q3_K super-blocks (quantize_row_q3_K_ref)."""
    # Sub-blocks as columns [16, sub-blocks]: the running sums then step along contiguous rows.
    levels, scales = _make_q3_quants(superblocks.reshape(-1, SUB_BLOCK_VALUES).T.contiguous())
    levels, scales = _sub_blocks(levels.T), scales.reshape(-1, 16)
    # The first scale of largest magnitude, as llama.cpp's scan `if (|s| > amax)` finds it.
    first_largest = common.positive_part(scales.abs()).max(1).indices
    largest = scales.gather(1, first_largest[:, None]).flatten()
    has_scale = largest != 0
    inverse = common.divided(-float(_Q3_SCALE_NMAX), largest)
    # nearest_int stored in an int8, then clamped to -32..31 and offset; all zero without a scale.
    codes = _as_int8(common.nearest_int(inverse[:, None] * scales)).clamp(-_Q3_SCALE_NMAX, _Q3_SCALE_NMAX - 1)
    codes = torch.where(has_scale[:, None], codes + _Q3_SCALE_NMAX, 0)
    d = fp16_bytes(torch.where(has_scale, common.divided(1.0, inverse), 0.0)[:, None])
    step = d.view(torch.float16).float() * (codes - _Q3_SCALE_NMAX).float()
    requantized = common.nearest_int(_sub_blocks(superblocks) / step[..., None]).clamp(-_Q3_NMAX, _Q3_NMAX - 1)
    # A sub-block whose step is zero keeps the levels of its own fit, as in llama.cpp.
    levels = torch.where(step[..., None] != 0, requantized + _Q3_NMAX, levels).reshape(-1, VALUES_PER_BLOCK)
    parts = [common.pack_fields(levels >> 2, 1, 1), common.pack_fields(levels & 3, 2, 2), _pack_q3_scales(codes), d]
    return torch.cat(parts, dim=1)


def _quantize_superblocks(superblocks: torch.Tensor, type_name: str) -> torch.Tensor:
    return _quantize_q2(superblocks) if type_name == "Q2_K" else _quantize_q3(superblocks)


def quantize(values: torch.Tensor, type_name: str) -> torch.Tensor:
    """fp32 values [rows, row_length] (a multiple of 256) -> uint8 blocks [rows, bytes_per_row].

    The bytes that llama.cpp's quantize_row_q2_K_ref or quantize_row_q3_K_ref writes for each row.
    """
    return common.quantize_rows(values, type_name, FORMATS, _quantize_superblocks)


# ---- the edit


orthogonalize_reference_ = common.reference_edit(FORMATS, dequantize, quantize)
