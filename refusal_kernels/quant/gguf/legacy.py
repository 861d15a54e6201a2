"""llama.cpp's legacy GGUF block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (ggml-common.h, ggml-quants.c).

Each row of a tensor is cut into blocks of 32 consecutive values; a block stands alone and
begins with its fp16 scale d. All multi-byte fields are little-endian, as GGUF stores them:

  type  bytes  fields, in order                  element j of the block
  Q4_0  18     d, qs[16]                         d * (q_j - 8),   q_j in 0..15
  Q4_1  20     d, m, qs[16]                      d * q_j + m,     q_j in 0..15
  Q5_0  22     d, qh[4], qs[16]                  d * (q_j - 16),  q_j in 0..31
  Q5_1  24     d, m, qh[4], qs[16]               d * q_j + m,     q_j in 0..31
  Q8_0  34     d, qs[32]                         d * qs[j],       qs[j] int8

d and m are fp16. In the 4- and 5-bit formats byte qs[j] (j < 16) holds the low four bits of
element j in its low nibble and those of element j + 16 in its high nibble; the fifth bit of
element j is bit j of qh read as a uint32 (bit j % 8 of byte qh[j // 8]).

The reference quantizers (quantize_row_*_ref) work in fp32 on each block x and round d and m
to fp16 only when storing them, so the quants are computed with the fp32 scale:
  Q4_0, Q5_0  max = the element of largest |x| (the first on a tie), sign kept; d = max / -8
              (-16); id = 1 / d, or 0 when d = 0; q = min(15 (31), trunc(x * id + 8.5 (16.5))).
              max lands exactly on level 0; an element of the opposite sign and the same
              magnitude would need level 16 (32) and is clamped one step short.
  Q4_1, Q5_1  d = (max(x) - min(x)) / 15 (31); m = min(x); q = min(15 (31), trunc((x - m) * id + 0.5)).
  Q8_0        d = max|x| / 127; q = roundf(x * id), halves rounded away from zero.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch

from ..._checks import (
    check_float,
)
from ._blocks import check_blocks, check_type_name, fp16_bytes, fp16_values, orthogonalize_blocks_

BLOCK_VALUES = 32
_HALF_BLOCK = BLOCK_VALUES // 2
_QH_BYTES = BLOCK_VALUES // 8
_Q8_MAX = 127


class _Spec(NamedTuple):
    bits: int  # per quant: 4, 5 or 8
    offset: int  # value = d * (q - offset) where there is no m
    has_min: bool  # an fp16 m follows d: value = d * q + m

    @property
    def scale_bytes(self) -> int:
        return 2 * (1 + self.has_min)

    @property
    def top_level(self) -> int:
        return (1 << self.bits) - 1


_SPECS = {
    "Q4_0": _Spec(bits=4, offset=8, has_min=False),
    "Q4_1": _Spec(bits=4, offset=0, has_min=True),
    "Q5_0": _Spec(bits=5, offset=16, has_min=False),
    "Q5_1": _Spec(bits=5, offset=0, has_min=True),
    "Q8_0": _Spec(bits=8, offset=0, has_min=False),
}

# type name -> (values per block, bytes per block)
FORMATS = {name: (BLOCK_VALUES, spec.scale_bytes + BLOCK_VALUES * spec.bits // 8) for name, spec in _SPECS.items()}


def _format(type_name: str) -> _Spec:
    check_type_name(type_name, FORMATS)
    return _SPECS[type_name]


def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def _unpack_quants(packed: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """The quant bytes of each block [..., 16, 20 or 32] -> int32 q [..., 32], as stored."""
    if spec.bits == 8:
        return packed.view(torch.int8).int()
    qs = packed[..., -_HALF_BLOCK:]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).int()
    if spec.bits == 4:
        return q
    high = (packed[..., :_QH_BYTES, None] >> _bit_shifts(packed.device)) & 1
    return q | (high.reshape(q.shape).int() << 4)


def _pack_quants(q: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Inverse of `_unpack_quants`: q [..., 32] (integral floats) -> the quant bytes of each block."""
    if spec.bits == 8:
        return q.to(torch.int8).view(torch.uint8)
    q = q.to(torch.uint8)
    nibbles = q & 0xF
    qs = nibbles[..., :_HALF_BLOCK] | (nibbles[..., _HALF_BLOCK:] << 4)
    if spec.bits == 4:
        return qs
    high = (q >> 4).reshape(*q.shape[:-1], _QH_BYTES, 8)
    qh = (high << _bit_shifts(q.device)).sum(dim=-1).to(torch.uint8)
    return torch.cat([qh, qs], dim=-1)


def dequantize(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """uint8 blocks [rows, bytes_per_row] -> fp32 values [rows, row_length] (row_length = 32 per block)."""
    spec = _format(type_name)
    check_blocks(blocks, type_name, FORMATS)
    rows, num_blocks = blocks.shape[0], blocks.shape[1] // FORMATS[type_name][1]
    grouped = blocks.reshape(rows, num_blocks, FORMATS[type_name][1])
    d = fp16_values(grouped[..., :2])
    q = _unpack_quants(grouped[..., spec.scale_bytes :], spec)
    values = d * (q - spec.offset).float()
    if spec.has_min:
        values = values + fp16_values(grouped[..., 2:4])
    return values.reshape(rows, num_blocks * BLOCK_VALUES)


def _divided(values: torch.Tensor, divisor: int) -> torch.Tensor:
    # A tensor divisor keeps this a true division: on CUDA torch turns division by a Python
    # scalar into multiplication by its reciprocal, which can round differently from llama.cpp.
    return values / torch.tensor(float(divisor), device=values.device)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, 0.0, 1.0 / d)


def _rounded_half_away(x: torch.Tensor) -> torch.Tensor:
    """roundf: halves away from zero (torch.round sends them to the even neighbour)."""
    magnitude = x.abs()
    whole = magnitude.floor()
    return torch.sign(x) * torch.where(magnitude - whole >= 0.5, whole + 1, whole)


def _scales_and_quants(x: torch.Tensor, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """fp32 blocks [..., 32] -> (d [..., 1], m [..., 1] or None, q [..., 32]), all fp32, as the reference quantizers."""
    if spec.has_min:
        low = x.amin(dim=-1, keepdim=True)
        d = _divided(x.amax(dim=-1, keepdim=True) - low, spec.top_level)
        q = torch.trunc((x - low) * _inverse(d) + 0.5).clamp(0, spec.top_level)
        return d, low, q
    if spec.bits == 8:
        d = _divided(x.abs().amax(dim=-1, keepdim=True), _Q8_MAX)
        return d, None, _rounded_half_away(x * _inverse(d))
    signed_max = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))
    d = _divided(signed_max, -spec.offset)
    q = torch.trunc(x * _inverse(d) + (spec.offset + 0.5)).clamp(0, spec.top_level)
    return d, None, q


def quantize(values: torch.Tensor, type_name: str) -> torch.Tensor:
    """fp32 values [rows, row_length] -> uint8 blocks [rows, bytes_per_row], as llama.cpp's reference quantizer.

    row_length must be a multiple of 32. fp16 and bf16 values are widened to fp32 first.
    """
    spec = _format(type_name)
    check_float(values, "values")
    if values.dim() != 2 or values.shape[1] % BLOCK_VALUES:
        raise ValueError(
            f"values must be 2-D [rows, row_length] with row_length a multiple of {BLOCK_VALUES}, "
            f"got shape {tuple(values.shape)}"
        )
    rows, num_blocks = values.shape[0], values.shape[1] // BLOCK_VALUES
    d, m, q = _scales_and_quants(values.float().reshape(rows, num_blocks, BLOCK_VALUES), spec)
    scales = [fp16_bytes(d)] if m is None else [fp16_bytes(d), fp16_bytes(m)]
    return torch.cat([*scales, _pack_quants(q, spec)], dim=-1).reshape(rows, num_blocks * FORMATS[type_name][1])


def orthogonalize_reference_(
    blocks: torch.Tensor, type_name: str, direction: torch.Tensor, scale: float = 1.0, layout: str = "matrix"
) -> None:
    """Dequantize, orthogonalize in fp32, requantize every block with fresh scales; writes `blocks`.

    layout "matrix": the rows of `blocks` are the d_model outputs of a linear weight W [out, in]
    (GGUF's order), W <- W - scale * d (d^T W), direction of length rows.
    layout "rows": each row is a d_model vector (token embeddings), v <- v - scale * (v . d) d,
    direction of length row_length.
    """
    row_length = check_blocks(blocks, type_name, FORMATS)
    codec = (partial(dequantize, type_name=type_name), partial(quantize, type_name=type_name))
    orthogonalize_blocks_(blocks, row_length, direction, scale, layout, *codec)
