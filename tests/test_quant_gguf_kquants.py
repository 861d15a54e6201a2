"""The K-quant GGUF references: Q4_K, Q5_K and Q6_K layouts, quantizers and the in-place edit.

What is checked against what:
  * dequantize against gguf-py's `gguf.quants.dequantize` (a numpy port of llama.cpp's
    dequantize_row_q*_K), bit for bit, on quantized and on random blocks; the grids of the
    bounds below are read from the bytes with gguf-py too (Q4_K.get_scale_min).
  * quantize: llama.cpp itself is not available here, so these tests check properties only:
    every value lands on the nearest level of its sub-block's stored grid, the RMS error of
    each format stays below a bound, and awkward rows stay finite (zero rows exactly zero).
    The byte-for-byte comparison with llama.cpp's quantize_row_q4_K_ref, quantize_row_q5_K_ref
    and quantize_row_q6_K_ref (transcribed from ggml/src/ggml-quants.c and compiled with gcc on
    x86-64) was made when the module was written and is not repeated here.
"""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import Q4_K
from op_samples import IDENTICAL_BLOCKS, assert_gguf_close, identical_block_fraction

from refusal_kernels import reference
from refusal_kernels.quant._common import orthogonalized_float
from refusal_kernels.quant.gguf import kquants, orthogonalize_

TYPES = sorted(kquants.FORMATS)
# The largest level of each format's quants (Q6_K's are signed, -32..31).
NMAX = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 31}
# RMS error over RMS value of quantize -> dequantize on standard normal data.
RELATIVE_RMS_BOUND = {"Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.019}
# Room for the fp32 rounding of a dequantized value and of the quantizer's division.
FP32_SLACK = 2.0**-20


def _normal(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _gguf_dequantize(blocks, type_name):
    values = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(blocks.shape[0], -1)


def _fp16(superblocks, offset):
    return superblocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32)


def _grid(blocks, type_name):
    """(spacing, low, high) per value, fp64 [rows, row_length]: its sub-block's levels are low, low + spacing, ..., high."""
    superblocks = blocks.numpy().reshape(-1, kquants.FORMATS[type_name][1])
    if type_name == "Q6_K":
        step = _fp16(superblocks, 208) * superblocks[:, 192:208].view(np.int8).astype(np.float32)
        ends = np.stack([-32 * step, 31 * step])
        spacing, low, high = np.abs(step), ends.min(0), ends.max(0)
        per_sub_block = 16
    else:
        scales, mins = Q4_K.get_scale_min(superblocks[:, 4:16])
        spacing = _fp16(superblocks, 0) * scales.astype(np.float32)
        low = -_fp16(superblocks, 2) * mins.astype(np.float32)
        high = low + NMAX[type_name] * spacing
        per_sub_block = 32

    def per_value(t):
        return torch.from_numpy(np.repeat(t.astype(np.float64), per_sub_block, axis=1)).reshape(blocks.shape[0], -1)

    return per_value(spacing), per_value(low), per_value(high)


def _rounding_bound(blocks, type_name, target):
    """How far each dequantized value may be from `target` if it is target's nearest level in the stored grid."""
    spacing, low, high = _grid(blocks, type_name)
    target = target.double()
    outside = (low - target).clamp(min=0) + (target - high).clamp(min=0)
    slack = FP32_SLACK * (target.abs() + low.abs() + high.abs())
    return torch.maximum(spacing / 2, outside) + slack


def _assert_nearest_levels(blocks, type_name, target):
    error = (kquants.dequantize(blocks, type_name).double() - target.double()).abs()
    assert bool((error <= _rounding_bound(blocks, type_name, target)).all())


def _random_blocks(rows, blocks_per_row, type_name, seed=0):
    """Random bytes, with each fp16 scale set to a finite value of magnitude 2**-8 .. 2."""
    generator = torch.Generator().manual_seed(seed)
    bytes_per_block = kquants.FORMATS[type_name][1]
    blocks = torch.randint(0, 256, (rows * blocks_per_row, bytes_per_block), dtype=torch.uint8, generator=generator)
    offsets = (208,) if type_name == "Q6_K" else (0, 2)
    for offset in offsets:
        magnitude = 2 ** torch.empty(rows * blocks_per_row).uniform_(-8, 1, generator=generator)
        sign = torch.randint(0, 2, (rows * blocks_per_row,), generator=generator) * 2 - 1
        blocks[:, offset : offset + 2] = (magnitude * sign).half().reshape(-1, 1).view(torch.uint8)
    return blocks.reshape(rows, -1)


def test_formats():
    assert kquants.FORMATS == {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
    for name, sizes in kquants.FORMATS.items():
        assert sizes == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_gguf_on_quantized_blocks(type_name):
    blocks = kquants.quantize(_normal(16, 512), type_name)
    assert blocks.dtype == torch.uint8
    assert blocks.shape == (16, 2 * kquants.FORMATS[type_name][1])
    values = kquants.dequantize(blocks, type_name)
    assert values.dtype == torch.float32
    assert torch.equal(values.view(torch.int32), _gguf_dequantize(blocks, type_name).view(torch.int32))


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_gguf_on_random_bytes(type_name):
    blocks = _random_blocks(24, 2, type_name)
    values = kquants.dequantize(blocks, type_name)
    assert bool(torch.isfinite(values).all())
    assert torch.equal(values.view(torch.int32), _gguf_dequantize(blocks, type_name).view(torch.int32))


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_rounds_each_value_to_its_nearest_level(type_name):
    values = _normal(32, 512)
    _assert_nearest_levels(kquants.quantize(values, type_name), type_name, values)


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_rms_error(type_name):
    values = _normal(32, 512)
    error = kquants.dequantize(kquants.quantize(values, type_name), type_name) - values
    relative_rms = error.square().mean().sqrt() / values.square().mean().sqrt()
    assert relative_rms < RELATIVE_RMS_BOUND[type_name]


def _awkward_rows():
    rows = _normal(8, 512) * 0.01
    rows[0] = 0.0
    rows[1] = 0.37
    rows[2] = -2.5
    rows[3, 256:] = 0.0
    rows[4:6, ::256] = 40.0  # one outlier per super-block
    rows[6, 7::256] = -60.0
    rows[7, :32] = 1e-30  # a sub-block far below the rest of its super-block
    return rows


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_awkward_rows(type_name):
    rows = _awkward_rows()
    blocks = kquants.quantize(rows, type_name)
    restored = kquants.dequantize(blocks, type_name)
    assert bool(torch.isfinite(restored).all())
    assert torch.equal(restored[0], torch.zeros(512))
    assert torch.equal(restored[3, 256:], torch.zeros(256))
    for row, constant in ((1, 0.37), (2, -2.5)):
        # Only the fp16 scale's rounding separates a constant row from its value.
        assert torch.allclose(restored[row], torch.full((512,), constant), rtol=2**-10, atol=0)
    for row, column in ((4, 0), (5, 256), (6, 7)):
        assert abs(restored[row, column] - rows[row, column]) < 0.05 * abs(rows[row, column])
    _assert_nearest_levels(blocks, type_name, rows)


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_is_row_by_row(type_name):
    values = _normal(6, 768, seed=3)
    blocks = kquants.quantize(values, type_name)
    assert torch.equal(kquants.quantize(values[2:3], type_name), blocks[2:3])
    # Super-blocks are independent: a row is the concatenation of its super-blocks.
    pieces = [kquants.quantize(values[:, 256 * k : 256 * (k + 1)], type_name) for k in range(3)]
    assert torch.equal(torch.cat(pieces, dim=1), blocks)


def _edit_case(type_name, layout, seed=0, shape=None):
    """Quantized blocks with a strong component along the direction (else requantizing would mostly undo the edit)."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape or ((32, 512) if layout == "matrix" else (16, 512))
    length = rows if layout == "matrix" else cols
    direction = torch.randn(length, generator=generator)
    amounts = 8 * torch.randn(cols if layout == "matrix" else rows, generator=generator)
    component = torch.outer(reference.unit(direction), amounts)
    values = torch.randn(rows, cols, generator=generator) + (component if layout == "matrix" else component.T)
    return kquants.quantize(values, type_name), direction


def _edited_float(blocks, type_name, direction, scale, layout):
    weight = kquants.dequantize(blocks, type_name)
    if layout == "matrix":
        return orthogonalized_float(weight, direction, scale)
    return reference.ablate(weight, direction, scale)


@pytest.mark.parametrize("layout", ["matrix", "rows"])
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_orthogonalize_reference_is_quantize_of_the_float_edit(type_name, layout, scale):
    blocks, direction = _edit_case(type_name, layout)
    before = blocks.clone()
    pointer = blocks.data_ptr()
    expected = kquants.quantize(_edited_float(blocks, type_name, direction, scale, layout), type_name)
    kquants.orthogonalize_reference_(blocks, type_name, direction, scale, layout=layout)
    assert blocks.data_ptr() == pointer
    assert not torch.equal(blocks, before)
    assert torch.equal(blocks, expected)


# The reference and the fused kernel (through the public entry point), same arguments.
EDITS = {"reference": kquants.orthogonalize_reference_, "kernel": orthogonalize_}


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("layout", ["matrix", "rows"])
@pytest.mark.parametrize("type_name", TYPES)
def test_orthogonalize_leaves_only_rounding_along_the_direction(type_name, layout, edit):
    blocks, direction = _edit_case(type_name, layout)
    unit = reference.unit(direction).double()
    target = _edited_float(blocks, type_name, direction, 1.0, layout)
    dim = 0 if layout == "matrix" else 1
    component_before = (kquants.dequantize(blocks, type_name).double().movedim(dim, -1) @ unit).abs()
    EDITS[edit](blocks, type_name, direction, layout=layout)
    component = (kquants.dequantize(blocks, type_name).double().movedim(dim, -1) @ unit).abs()
    float_leftover = (target.double().movedim(dim, -1) @ unit).abs()
    rounding = _rounding_bound(blocks, type_name, target).movedim(dim, -1) @ unit.abs()
    assert bool((component <= rounding + float_leftover).all())
    assert component.square().mean() < 0.01 * component_before.square().mean()


# The fused kernel sums c = d^T W (or v . d) in another order than the reference (see
# IDENTICAL_BLOCKS): every value must be within one step of its block, and most blocks identical.
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("layout", ["matrix", "rows"])
@pytest.mark.parametrize("type_name", TYPES)
def test_kernel_matches_reference(type_name, layout, scale):
    blocks, direction = _edit_case(type_name, layout, shape=(65, 16 * kquants.VALUES_PER_BLOCK))
    expected = blocks.clone()
    kquants.orthogonalize_reference_(expected, type_name, direction, scale, layout)
    orthogonalize_(blocks, type_name, direction, scale, layout)
    assert_gguf_close(blocks, expected, type_name)
    assert identical_block_fraction(blocks, expected, type_name) >= IDENTICAL_BLOCKS[layout]


def _bad_calls(type_name, layout):
    """(argument named in the error, error type, the blocks passed, keyword arguments) for one layout."""
    blocks, direction = _edit_case(type_name, layout)
    wrong_length = torch.randn(direction.shape[0] + 1)
    bad_blocks = [
        ("blocks", TypeError, blocks.view(torch.int8), {}),
        ("blocks", ValueError, blocks.reshape(-1), {}),
        ("blocks", ValueError, blocks.reshape(1, *blocks.shape), {}),
        ("blocks", ValueError, blocks.T.contiguous().T, {}),
        ("blocks", ValueError, blocks[:, :-1].contiguous(), {}),
    ]
    bad_arguments = [
        ("type_name", ValueError, {"type_name": "Q3_K"}),
        ("type_name", ValueError, {"type_name": "q4_k"}),
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


@pytest.mark.parametrize("layout", ["matrix", "rows"])
@pytest.mark.parametrize("type_name", TYPES)
def test_bad_input_raises_before_writing(type_name, layout):
    calls, direction = _bad_calls(type_name, layout)
    for name, error, blocks, arguments in calls:
        keywords = {"type_name": type_name, "direction": direction, "scale": 1.0, "layout": layout, **arguments}
        before = blocks.clone()
        with pytest.raises(error, match=name):
            kquants.orthogonalize_reference_(blocks, **keywords)
        assert torch.equal(blocks, before), (name, arguments)


@pytest.mark.parametrize(
    ("values", "error", "name"),
    [
        (torch.ones(2, 300), ValueError, "values"),
        (torch.ones(512), ValueError, "values"),
        (torch.ones(2, 256, dtype=torch.int32), TypeError, "values"),
        (torch.full((2, 256), float("inf")), ValueError, "values"),
    ],
)
def test_quantize_rejects_bad_values(values, error, name):
    with pytest.raises(error, match=name):
        kquants.quantize(values, "Q4_K")
    with pytest.raises(ValueError, match="type_name"):
        kquants.quantize(torch.ones(2, 256), "Q8_K")
