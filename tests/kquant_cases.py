"""Cases and checks shared by the K-quant tests (tests/test_quant_gguf_kquants*.py), all five types.

The grid of each sub-block is read from the bytes with numpy, following gguf-py's unpacking
(Q4_K.get_scale_min for Q4_K and Q5_K), so that the bounds do not trust the module under test.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf.quants import Q4_K

from refusal_kernels import reference
from refusal_kernels.quant._common import orthogonalized_float
from refusal_kernels.quant.gguf import kquants, kquants_low

# type name -> the module of its reference.
MODULES = {type_name: module for module in (kquants, kquants_low) for type_name in module.FORMATS}
TYPES = sorted(MODULES)
# RMS error over RMS value of quantize -> dequantize on standard normal data.
RELATIVE_RMS_BOUND = {"Q2_K": 0.31, "Q3_K": 0.16, "Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.019}
# Room for the fp32 rounding of a dequantized value and of the quantizer's division.
FP32_SLACK = 2.0**-20
# The offset of each format's fp16 scales within a super-block.
FP16_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# Type names each module's reference must reject (another module's type, a lower-case one).
WRONG_TYPE_NAMES = {kquants: ("Q3_K", "q4_k"), kquants_low: ("Q4_K", "q2_k")}


def normal(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def bytes_per_block(type_name):
    return MODULES[type_name].FORMATS[type_name][1]


def gguf_dequantize(blocks, type_name):
    values = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(blocks.shape[0], -1)


def _fp16(superblocks, offset):
    return superblocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32)


def _signed_grid(step, low_level, high_level):
    """(spacing, low, high) of levels step * low_level .. step * high_level, whatever step's sign."""
    ends = np.stack([low_level * step, high_level * step])
    return np.abs(step), ends.min(0), ends.max(0)


def _q3_steps(superblocks):
    """d * (s_j - 32) per sub-block [blocks, 16], unpacked as gguf-py's Q3_K does."""
    packed = superblocks[:, 96:108]
    low = (packed[:, None, :8] >> np.array([0, 4], dtype=np.uint8)[None, :, None]).reshape(-1, 16) & 0xF
    high = (packed[:, None, 8:] >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]).reshape(-1, 16) & 3
    codes = (low | high << 4).astype(np.float32) - 32
    return _fp16(superblocks, 108) * codes


def _sub_block_grid(superblocks, type_name):
    """(spacing, low, high) per sub-block [blocks, sub-blocks], and the values per sub-block."""
    if type_name == "Q6_K":
        step = _fp16(superblocks, 208) * superblocks[:, 192:208].view(np.int8).astype(np.float32)
        return (*_signed_grid(step, -32, 31), 16)
    if type_name == "Q3_K":
        return (*_signed_grid(_q3_steps(superblocks), -4, 3), 16)
    if type_name == "Q2_K":
        codes = superblocks[:, :16]
        spacing = _fp16(superblocks, 80) * (codes & 0xF).astype(np.float32)
        low = -_fp16(superblocks, 82) * (codes >> 4).astype(np.float32)
        return spacing, low, low + 3 * spacing, 16
    scales, mins = Q4_K.get_scale_min(superblocks[:, 4:16])
    spacing = _fp16(superblocks, 0) * scales.astype(np.float32)
    low = -_fp16(superblocks, 2) * mins.astype(np.float32)
    return spacing, low, low + {"Q4_K": 15, "Q5_K": 31}[type_name] * spacing, 32


def grid(blocks, type_name):
    """(spacing, low, high) per value, fp64 [rows, row_length]: its sub-block's levels are low, low + spacing, ..., high."""
    *ends, per_sub_block = _sub_block_grid(blocks.numpy().reshape(-1, bytes_per_block(type_name)), type_name)

    def per_value(t):
        return torch.from_numpy(np.repeat(t.astype(np.float64), per_sub_block, axis=1)).reshape(blocks.shape[0], -1)

    return tuple(per_value(t) for t in ends)


def rounding_bound(blocks, type_name, target):
    """How far each dequantized value may be from `target` if it is target's nearest level in the stored grid."""
    spacing, low, high = grid(blocks, type_name)
    target = target.double()
    outside = (low - target).clamp(min=0) + (target - high).clamp(min=0)
    slack = FP32_SLACK * (target.abs() + low.abs() + high.abs())
    return torch.maximum(spacing / 2, outside) + slack


def assert_nearest_levels(blocks, type_name, target):
    error = (MODULES[type_name].dequantize(blocks, type_name).double() - target.double()).abs()
    assert bool((error <= rounding_bound(blocks, type_name, target)).all())


def random_blocks(rows, blocks_per_row, type_name, seed=0):
    """Random bytes, with each fp16 scale set to a finite value of magnitude 2**-8 .. 2."""
    generator = torch.Generator().manual_seed(seed)
    size = (rows * blocks_per_row, bytes_per_block(type_name))
    blocks = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
    for offset in FP16_OFFSETS[type_name]:
        magnitude = 2 ** torch.empty(rows * blocks_per_row).uniform_(-8, 1, generator=generator)
        sign = torch.randint(0, 2, (rows * blocks_per_row,), generator=generator) * 2 - 1
        blocks[:, offset : offset + 2] = (magnitude * sign).half().reshape(-1, 1).view(torch.uint8)
    return blocks.reshape(rows, -1)


def awkward_rows(type_name):
    rows = normal(8, 512) * 0.01
    rows[0] = 0.0
    rows[1] = 0.37
    rows[2] = -2.5
    rows[3, 256:] = 0.0
    rows[4:6, ::256] = 40.0  # one outlier per super-block
    rows[6, 7::256] = -60.0
    # A sub-block far below the rest of its super-block (Q4_K's and Q5_K's are 32 long, the others' 16).
    rows[7, : 16 if type_name in kquants_low.FORMATS else 32] = 1e-30
    return rows


def edit_case(type_name, layout, seed=0, shape=None):
    """Quantized blocks with a strong component along the direction (else requantizing would mostly undo the edit).

    For Q2_K and Q3_K the component adds about 1.4 to each value in both layouts, more than these
    coarse grids' half spacing.
    """
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape or ((32, 512) if layout == "matrix" else (16, 512))
    length = rows if layout == "matrix" else cols
    direction = torch.randn(length, generator=generator)
    growth = (length / 32) ** 0.5 if type_name in kquants_low.FORMATS else 1
    amounts = 8 * growth * torch.randn(cols if layout == "matrix" else rows, generator=generator)
    component = torch.outer(reference.unit(direction), amounts)
    values = torch.randn(rows, cols, generator=generator) + (component if layout == "matrix" else component.T)
    return MODULES[type_name].quantize(values, type_name), direction


def edited_float(blocks, type_name, direction, scale, layout):
    weight = MODULES[type_name].dequantize(blocks, type_name)
    if layout == "matrix":
        return orthogonalized_float(weight, direction, scale)
    return reference.ablate(weight, direction, scale)


def bad_calls(type_name, layout):
    """(argument named in the error, error type, the blocks passed, keyword arguments) for one layout."""
    blocks, direction = edit_case(type_name, layout)
    wrong_length = torch.randn(direction.shape[0] + 1)
    bad_blocks = [
        ("blocks", TypeError, blocks.view(torch.int8), {}),
        ("blocks", ValueError, blocks.reshape(-1), {}),
        ("blocks", ValueError, blocks.reshape(1, *blocks.shape), {}),
        ("blocks", ValueError, blocks.T.contiguous().T, {}),
        ("blocks", ValueError, blocks[:, :-1].contiguous(), {}),
    ]
    bad_arguments = [
        *[("type_name", ValueError, {"type_name": name}) for name in WRONG_TYPE_NAMES[MODULES[type_name]]],
        ("direction", ValueError, {"direction": wrong_length}),
        ("direction", ValueError, {"direction": direction[None]}),
        ("direction", TypeError, {"direction": direction.to(torch.int64)}),
        ("direction", ValueError, {"direction": torch.zeros_like(direction)}),
        ("direction", ValueError, {"direction": torch.full_like(direction, float("nan"))}),
        ("direction", ValueError, {"direction": torch.cat([direction[:-1], torch.tensor([float("inf")])])}),
        ("scale", ValueError, {"scale": float("nan")}),
        ("scale", ValueError, {"scale": float("inf")}),
        ("layout", ValueError, {"layout": "columns"}),
    ]
    return [
        *bad_blocks,
        *[(name, error, blocks, arguments) for name, error, arguments in bad_arguments],
    ], direction
