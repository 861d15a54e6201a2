"""bitsandbytes NF4 (4-bit NormalFloat), with optional double quantization of the absmax.

Layout (W is [out, in] as in nn.Linear, flattened row-major to n = out * in values):
  packed   uint8, n / 2 elements (bitsandbytes keeps shape [n / 2, 1]): value 2k in the high
           nibble of byte k, value 2k + 1 in the low nibble; each nibble indexes `code`
  code     float32 [16], ascending: the NF4 levels in [-1, 1] (quant_state.code)
  absmax   per block of `blocksize` (64) consecutive flat values, ceil(n / blocksize) of them:
             plain:          float32, the block's absmax
             double-quant:   uint8 indices into `nested_code` (float32 [256], ascending, the
                             bitsandbytes dynamic map), with float32 `nested_absmax` per block
                             of `nested_blocksize` (256) absmax values and a float32 scalar
                             `nested_offset` (the mean absmax):
                             absmax[b] = nested_code[q[b]] * nested_absmax[b // 256] + nested_offset
  W.flat[k] = code[nibble k] * absmax[k // blocksize]
Requantization: each block's absmax comes from its updated values. With double quantization
the offset (a global value) and the nested scales are chosen from all updated block absmax
values first, and each absmax is rounded up to the next nested code level, so the dequantized
absmax still covers its block; nibbles then round to the nearest level.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._checks import check_direction_once, check_nf4
from . import _common

# The NF4 levels of QLoRA (Dettmers et al., 2023), as bitsandbytes stores them.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit dynamic map that bitsandbytes uses for nested absmax (ascending, [256])."""
    values = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = ((boundaries[:-1] + boundaries[1:]) / 2.0) * (10 ** (-(max_exponent_bits - 1) + i))
        values += means.tolist() + (-means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


class NF4Weight(NamedTuple):
    """The tensors of one NF4 weight; nested_* are None without double quantization."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 256


def pack(values: torch.Tensor) -> torch.Tensor:
    """Flat 4-bit indices [n] (n even) -> uint8 [n / 2], first value in the high nibble."""
    pairs = values.to(torch.uint8).reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [n / 2] (any shape) -> flat 4-bit indices int64 [n]."""
    flat = packed.reshape(-1)
    return torch.stack(((flat >> 4) & 0xF, flat & 0xF), dim=1).reshape(-1).long()


def block_absmax(q: NF4Weight) -> torch.Tensor:
    """The fp32 absmax of every block, decoding the nested quantization if any."""
    if q.nested_absmax is None:
        return q.absmax.float()
    nested_block = torch.arange(q.absmax.numel()) // q.nested_blocksize
    return q.nested_code[q.absmax.long()] * q.nested_absmax[nested_block] + q.nested_offset


def dequantize(q: NF4Weight, shape: tuple[int, int]) -> torch.Tensor:
    """The fp32 weight of `shape` [out, in]."""
    codes = q.code[unpack(q.packed)]
    block = torch.arange(codes.numel()) // q.blocksize
    return (codes * block_absmax(q)[block]).reshape(shape)


def _nearest_level(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return (x[:, None] - code).abs().argmin(dim=1)  # first of two equally near levels


def quantize(
    weight: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = False,
    nested_blocksize: int = 256,
    code: torch.Tensor = NF4_CODE,
) -> NF4Weight:
    """NF4-quantize weight [out, in] with fresh absmax values (and nested scales when double_quant)."""
    flat = weight.float().reshape(-1)
    block = torch.arange(flat.numel()) // blocksize
    num_blocks = -(-flat.numel() // blocksize)
    absmax = torch.zeros(num_blocks).scatter_reduce(0, block, flat.abs(), "amax")
    nested = {}
    if double_quant:
        nested_code = dynamic_code()
        offset = absmax.mean()
        centered = absmax - offset
        nested_block = torch.arange(num_blocks) // nested_blocksize
        nested_absmax = torch.zeros(-(-num_blocks // nested_blocksize)).scatter_reduce(
            0, nested_block, centered.abs(), "amax"
        )
        nested_absmax = torch.where(nested_absmax > 0, nested_absmax, torch.ones_like(nested_absmax))
        # Round up to the next level so that the decoded absmax still covers its block.
        level = torch.searchsorted(nested_code, centered / nested_absmax[nested_block]).clamp(max=255)
        absmax = level.to(torch.uint8)
        nested = {"nested_absmax": nested_absmax, "nested_offset": offset, "nested_code": nested_code}
    q = NF4Weight(torch.empty(0), absmax, code, blocksize, nested_blocksize=nested_blocksize, **nested)
    decoded = block_absmax(q)[block]
    normalized = torch.where(decoded > 0, flat / decoded, torch.zeros_like(flat))
    return q._replace(packed=pack(_nearest_level(normalized, code)))


def op_args(q: NF4Weight, direction: torch.Tensor, scale: float) -> tuple:
    """The arguments of refusal::orthogonalize_nf4, in schema order."""
    return (
        q.packed,
        q.absmax,
        q.code,
        direction,
        q.blocksize,
        q.nested_absmax,
        q.nested_offset,
        q.nested_code,
        q.nested_blocksize,
        scale,
    )


def check(q: NF4Weight, direction: torch.Tensor, scale: float = 1.0) -> tuple[int, int]:
    """The op's metadata checks; returns the weight's shape (out, in). Writes nothing."""
    return check_nf4(*op_args(q, direction, scale))


def orthogonalize_reference_(q: NF4Weight, direction: torch.Tensor, scale: float = 1.0) -> None:
    """Dequantize, orthogonalize in fp32, requantize with fresh absmax; writes every tensor of q."""
    shape = check(q, direction, scale)
    updated = _common.orthogonalized_float(dequantize(q, shape), direction, scale)
    fresh = quantize(updated, q.blocksize, q.nested_absmax is not None, q.nested_blocksize, q.code)
    q.packed.copy_(fresh.packed.reshape(q.packed.shape))
    q.absmax.copy_(fresh.absmax)
    if q.nested_absmax is not None:
        q.nested_absmax.copy_(fresh.nested_absmax)
        q.nested_offset.copy_(fresh.nested_offset)


def orthogonalize_(q: NF4Weight, direction: torch.Tensor, scale: float = 1.0) -> None:
    """In-place W <- W - scale * d (d^T W) on the NF4 storage (the fused kernel of the storage's device)."""
    check_direction_once(direction, q.packed)
    torch.ops.refusal.orthogonalize_nf4(*op_args(q, direction, scale))
