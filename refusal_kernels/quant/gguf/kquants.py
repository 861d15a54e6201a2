"""llama.cpp's K-quant formats Q4_K, Q5_K and Q6_K: layouts and pure-torch references.

A row of a GGUF tensor is a run of super-blocks of 256 values, each stored as one C struct
of ggml-common.h (block_q4_K, block_q5_K, block_q6_K), little-endian and without padding.
Byte offsets below are within one super-block; value i is the i-th of its 256 values.

Q4_K, 144 bytes: 8 sub-blocks of 32 values, each with a 6-bit scale sc_j and a 6-bit min m_j.
    0..1     d       fp16, the scale of the sub-block scales
    2..3     dmin    fp16, the scale of the sub-block mins
    4..15    scales  s[0..11]: for j < 4, sc_j = s[j] & 63 and m_j = s[j + 4] & 63;
                     for j >= 4, sc_j = (s[j + 4] & 0xF) | (s[j - 4] >> 6) << 4
                             and m_j = (s[j + 4] >> 4) | (s[j] >> 6) << 4
    16..143  qs      4-bit quants: byte 32c + l holds q of value 64c + l in its low nibble
                     and q of value 64c + 32 + l in its high nibble (c = 0..3, l = 0..31)
    value i = (d * sc_j) * q_i - dmin * m_j, with j = i // 32 and q_i in 0..15

Q5_K, 176 bytes: Q4_K's d, dmin and scales (bytes 0..15), then
    16..47   qh      the fifth bit of each quant: bit b of byte l is that of value 32b + l
    48..175  qs      the low 4 bits, packed as Q4_K's qs
    value i = (d * sc_j) * q_i - dmin * m_j, with j = i // 32 and q_i = low | high << 4 in 0..31

Q6_K, 210 bytes: 16 sub-blocks of 16 values, each with an 8-bit scale sc_j.
    0..127   ql      low 4 bits: byte 64h + p holds value 128h + p in its low nibble and
                     value 128h + 64 + p in its high nibble (h = 0, 1, p = 0..63)
    128..191 qh      high 2 bits: bits 2t and 2t + 1 of byte 32h + l are those of value
                     128h + 32t + l (t = 0..3, l = 0..31)
    192..207 scales  int8 sc_j
    208..209 d       fp16
    value i = (d * sc_j) * (q_i - 32), with j = i // 16 and q_i = low | high << 4 in 0..63

All arithmetic is fp32, in the order the parentheses show (llama.cpp's dequantize_row_q*_K).

`quantize` follows llama.cpp's reference quantizers, those used without an importance matrix:
  Q4_K  quantize_row_q4_K_ref: per sub-block, make_qkx2_quants(nmax 15, weights
        sqrt(mean x^2) + |x|, rmin -1, rdelta 0.1, nstep 20, squared error), then the
        scales and mins rounded to 6 bits against the super-block's largest ones;
  Q5_K  quantize_row_q5_K_ref: the same with nmax 31, rmin -0.5, rdelta 0.1, nstep 15;
  Q6_K  quantize_row_q6_K_ref: per sub-block, make_qx_quants(nmax 32, rmse_type 1), then
        the scales rounded to int8 against the super-block's largest one.
Each loop is kept, with fp32 sums accumulated in llama.cpp's order and nearest_int's
rounding (ties to even, through 1.5 * 2**23) emulated bit for bit, vectorized over blocks.
That arithmetic, the packing, make_qkx2_quants and the edit are shared with kquants_low
(Q2_K, Q3_K) through _kquant_common.
"""

from __future__ import annotations

import torch

from . import _kquant_common as common
from ._blocks import check_blocks, fp16_bytes

VALUES_PER_BLOCK = common.VALUES_PER_BLOCK
FORMATS = {"Q4_K": (VALUES_PER_BLOCK, 144), "Q5_K": (VALUES_PER_BLOCK, 176), "Q6_K": (VALUES_PER_BLOCK, 210)}

# The search parameters of make_qkx2_quants (nmax, rmin, rdelta, nstep) for the two formats with mins.
_MIN_FORMAT_SEARCH = {"Q4_K": (15, -1.0, 0.1, 20), "Q5_K": (31, -0.5, 0.1, 15)}
_Q6_NMAX = 32


def _sqrt(values: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: torch's fp32 sqrt on CPU may be off by an ulp, one in double is exact."""
    return torch.sqrt(values.double()).float()


# ---- bytes


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """fp32 [blocks] rounded to fp16, as bytes [blocks, 2]."""
    return fp16_bytes(values.reshape(-1, 1))


def _unpack_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes of 6-bit scales and mins of Q4_K and Q5_K -> (sc, m), int32 [blocks, 8] each."""
    low_scales, low_mins, rest = packed.int().reshape(-1, 3, 4).unbind(1)
    scales = torch.cat([low_scales & 63, (rest & 0xF) | ((low_scales >> 2) & 0x30)], dim=1)
    mins = torch.cat([low_mins & 63, (rest >> 4) | ((low_mins >> 2) & 0x30)], dim=1)
    return scales, mins


def _pack_scales_and_mins(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Inverse of `_unpack_scales_and_mins`: int32 [blocks, 8] each, values in 0..63 -> uint8 [blocks, 12]."""
    first = scales[:, :4] | (scales[:, 4:] >> 4) << 6
    second = mins[:, :4] | (mins[:, 4:] >> 4) << 6
    third = (scales[:, 4:] & 0xF) | (mins[:, 4:] & 0xF) << 4
    return torch.cat([first, second, third], dim=1).to(torch.uint8)


# ---- dequantize


def _dequantize_with_mins(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """Q4_K or Q5_K super-blocks [blocks, bytes] -> fp32 [blocks, 256]."""
    scales, mins = _unpack_scales_and_mins(blocks[:, 4:16])
    if type_name == "Q4_K":
        quants = common.unpack_fields(blocks[:, 16:], 4, 4)
    else:
        quants = common.unpack_fields(blocks[:, 48:], 4, 4) | common.unpack_fields(blocks[:, 16:48], 1, 1) << 4
    step = common.fp16_at(blocks, 0)[:, None] * scales.float()
    offset = common.fp16_at(blocks, 2)[:, None] * mins.float()
    values = step[..., None] * quants.reshape(-1, 8, 32).float() - offset[..., None]
    return values.reshape(-1, VALUES_PER_BLOCK)


def _dequantize_q6(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks [blocks, 210] -> fp32 [blocks, 256]."""
    quants = (common.unpack_fields(blocks[:, :128], 2, 4) | common.unpack_fields(blocks[:, 128:192], 2, 2) << 4) - 32
    step = common.fp16_at(blocks, 208)[:, None] * blocks[:, 192:208].view(torch.int8).float()
    return (step[..., None] * quants.reshape(-1, 16, 16).float()).reshape(-1, VALUES_PER_BLOCK)


def dequantize(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """uint8 blocks [rows, bytes_per_row] of `type_name` -> fp32 [rows, row_length] (llama.cpp's values)."""
    row_length = check_blocks(blocks, type_name, FORMATS)
    superblocks = blocks.reshape(-1, FORMATS[type_name][1])
    values = _dequantize_q6(superblocks) if type_name == "Q6_K" else _dequantize_with_mins(superblocks, type_name)
    return values.reshape(blocks.shape[0], row_length)


# ---- quantize: Q4_K and Q5_K


def _six_bit_codes(values: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """nearest_int(63 / largest * value) as llama.cpp stores it in a uint8 and clamps to 63 (0 if largest is 0)."""
    inverse = torch.where(largest > 0, common.divided(63.0, largest), 0.0)
    return (common.nearest_int(inverse[:, None] * values) & 0xFF).clamp(max=63)


def _quantize_with_mins(superblocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """fp32 [blocks, 256] -> Q4_K or Q5_K super-blocks (quantize_row_q4_K_ref, quantize_row_q5_K_ref)."""
    nmax, rmin, rdelta, nstep = _MIN_FORMAT_SEARCH[type_name]
    # Sub-blocks as columns [32, sub-blocks]: the running sums then step along contiguous rows.
    x = superblocks.reshape(-1, 32).T.contiguous()
    spread = _sqrt(common.running_sum(x * x) / 32)
    levels, scales, mins = common.make_qkx2_quants(x, spread + x.abs(), nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    largest_scale, largest_min = common.positive_part(scales).amax(1), common.positive_part(mins).amax(1)
    scale_codes, min_codes = _six_bit_codes(scales, largest_scale), _six_bit_codes(mins, largest_min)
    d, dmin = _fp16_bytes(largest_scale / 63), _fp16_bytes(largest_min / 63)
    step = d.view(torch.float16).float() * scale_codes.float()
    offset = dmin.view(torch.float16).float() * min_codes.float()
    x = superblocks.reshape(-1, 8, 32)
    requantized = common.nearest_int((x + offset[..., None]) / step[..., None]).clamp(0, nmax)
    # A sub-block whose step is zero keeps the levels of its own fit, as in llama.cpp.
    levels = torch.where(step[..., None] != 0, requantized, levels.T.reshape(-1, 8, 32)).reshape(-1, VALUES_PER_BLOCK)
    parts = [d, dmin, _pack_scales_and_mins(scale_codes, min_codes)]
    if type_name == "Q5_K":
        parts.append(common.pack_fields(levels >> 4, 1, 1))
    parts.append(common.pack_fields(levels & 0xF, 4, 4))
    return torch.cat(parts, dim=1)


# ---- quantize: Q6_K


def _signed_levels(x: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(l, sum of w x l, sum of w l^2) over each column, with l = nearest_int(inverse * x) in -32..31 and w = x^2."""
    levels = common.nearest_int(inverse * x).clamp(-_Q6_NMAX, _Q6_NMAX - 1)
    levels_float = levels.float()
    weights = x * x
    sum_lx, sum_l2 = common.running_sum(
        torch.stack([weights * x * levels_float, weights * levels_float * levels_float], 1)
    )
    return levels, sum_lx, sum_l2


def _make_qx_quants(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qx_quants(n, 32, x, L, rmse_type=1, NULL) on each column of x [n, groups].

    Returns (levels int32 [n, groups] in 0..63, offset by 32 as llama.cpp's L, scale [groups]).
    """
    magnitude, first_largest = x.abs().max(0)
    largest = x.gather(0, first_largest[None]).flatten()
    levels, sum_lx, sum_l2 = _signed_levels(x, common.divided(-_Q6_NMAX, largest))
    scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, 0.0)
    best = scale * sum_lx
    for step in [*range(-9, 0), *range(1, 10)]:
        inverse = common.divided(-(_Q6_NMAX + common.f32(0.1) * step).item(), largest)
        trial, trial_lx, trial_l2 = _signed_levels(x, inverse)
        better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
        levels = torch.where(better, trial, levels)
        scale = torch.where(better, trial_lx / trial_l2, scale)
        best = torch.where(better, scale * trial_lx, best)
    all_zero = magnitude < common.GROUP_MAX_EPS
    return torch.where(all_zero, 0, levels + _Q6_NMAX), torch.where(all_zero, 0.0, scale)


def _quantize_q6(superblocks: torch.Tensor) -> torch.Tensor:
    """fp32 [blocks, 256] -> Q6_K super-blocks (quantize_row_q6_K_ref)."""
    # Sub-blocks as columns [16, sub-blocks]: the running sums then step along contiguous rows.
    levels, scales = _make_qx_quants(superblocks.reshape(-1, 16).T.contiguous())
    levels, scales = levels.T.reshape(-1, 16, 16), scales.reshape(-1, 16)
    # The first scale of largest magnitude, as llama.cpp's scan `if (|s| > max_abs)` finds it.
    largest_magnitude, first_largest = common.positive_part(scales.abs()).max(1)
    largest = scales.gather(1, first_largest[:, None]).flatten()
    inverse = common.divided(-128.0, largest)
    d = _fp16_bytes(common.divided(1.0, inverse))
    # nearest_int clamped to 127, then stored in an int8.
    codes = ((common.nearest_int(inverse[:, None] * scales).clamp(max=127) + 128) & 0xFF) - 128
    step = d.view(torch.float16).float() * codes.float()
    requantized = common.nearest_int(superblocks.reshape(-1, 16, 16) / step[..., None]).clamp(-32, 31) + 32
    levels = torch.where(step[..., None] != 0, requantized, levels).reshape(-1, VALUES_PER_BLOCK)
    parts = [
        common.pack_fields(levels & 0xF, 2, 4),
        common.pack_fields(levels >> 4, 2, 2),
        codes.to(torch.int8).view(torch.uint8),
        d,
    ]
    packed = torch.cat(parts, dim=1)
    return torch.where((largest_magnitude < common.GROUP_MAX_EPS)[:, None], 0, packed)


def _quantize_superblocks(superblocks: torch.Tensor, type_name: str) -> torch.Tensor:
    return _quantize_q6(superblocks) if type_name == "Q6_K" else _quantize_with_mins(superblocks, type_name)


def quantize(values: torch.Tensor, type_name: str) -> torch.Tensor:
    """fp32 values [rows, row_length] (a multiple of 256) -> uint8 blocks [rows, bytes_per_row].

    The bytes that llama.cpp's quantize_row_q4_K_ref, quantize_row_q5_K_ref or quantize_row_q6_K_ref
    writes for each row.
    """
    return common.quantize_rows(values, type_name, FORMATS, _quantize_superblocks)


# ---- the edit


orthogonalize_reference_ = common.reference_edit(FORMATS, dequantize, quantize)
