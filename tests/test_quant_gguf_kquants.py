"""The K-quant GGUF references: layouts, quantizers and the in-place edit of all five types.

Q2_K and Q3_K (kquants_low) share every property test here with Q4_K, Q5_K and Q6_K (kquants);
tests/test_quant_gguf_kquants_low.py adds what is particular to them, and the cases and the
grid checks are in tests/kquant_cases.py.

What is checked against what:
  * dequantize against gguf-py's `gguf.quants.dequantize` (a numpy port of llama.cpp's
    dequantize_row_q*_K), bit for bit, on quantized and on random blocks; the grids of the
    bounds below are read from the bytes with numpy, following gguf-py's unpacking.
  * quantize: llama.cpp itself is not available here, so these tests check properties only:
    every value lands on the nearest level of its sub-block's stored grid, the RMS error of
    each format stays below a bound, and awkward rows stay finite (zero rows exactly zero).
    The byte-for-byte comparison with llama.cpp's quantize_row_q4_K_ref, quantize_row_q5_K_ref
    and quantize_row_q6_K_ref (transcribed from ggml/src/ggml-quants.c and compiled with gcc on
    x86-64) was made when the module was written and is not repeated here.
"""

import gguf
import pytest
import torch
from kquant_cases import (
    MODULES,
    RELATIVE_RMS_BOUND,
    TYPES,
    assert_nearest_levels,
    awkward_rows,
    bad_calls,
    edit_case,
    edited_float,
    gguf_dequantize,
    normal,
    random_blocks,
    rounding_bound,
)
from op_samples import IDENTICAL_BLOCKS, assert_gguf_close, identical_block_fraction

from refusal_kernels import reference
from refusal_kernels.quant.gguf import kquants, kquants_low, module_of, orthogonalize_

# The types whose kernel test_kernel_matches_reference compares with kquants' reference here
# (Q2_K and Q3_K: tests/test_quant_gguf_kquants_low.py).
KERNEL_TYPES = sorted(kquants.FORMATS)


def test_formats():
    assert kquants.FORMATS == {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
    for name, sizes in kquants.FORMATS.items():
        assert sizes == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_gguf_on_quantized_blocks(type_name):
    module = MODULES[type_name]
    blocks = module.quantize(normal(16, 512), type_name)
    assert blocks.dtype == torch.uint8
    assert blocks.shape == (16, 2 * module.FORMATS[type_name][1])
    values = module.dequantize(blocks, type_name)
    assert values.dtype == torch.float32
    assert torch.equal(values.view(torch.int32), gguf_dequantize(blocks, type_name).view(torch.int32))


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_gguf_on_random_bytes(type_name):
    blocks = random_blocks(24, 2, type_name)
    values = MODULES[type_name].dequantize(blocks, type_name)
    assert bool(torch.isfinite(values).all())
    assert torch.equal(values.view(torch.int32), gguf_dequantize(blocks, type_name).view(torch.int32))


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_rounds_each_value_to_its_nearest_level(type_name):
    values = normal(32, 512)
    assert_nearest_levels(MODULES[type_name].quantize(values, type_name), type_name, values)


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_rms_error(type_name):
    module = MODULES[type_name]
    values = normal(32, 512)
    error = module.dequantize(module.quantize(values, type_name), type_name) - values
    relative_rms = error.square().mean().sqrt() / values.square().mean().sqrt()
    assert relative_rms < RELATIVE_RMS_BOUND[type_name]


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_awkward_rows(type_name):
    module = MODULES[type_name]
    rows = awkward_rows(type_name)
    blocks = module.quantize(rows, type_name)
    restored = module.dequantize(blocks, type_name)
    assert bool(torch.isfinite(restored).all())
    assert torch.equal(restored[0], torch.zeros(512))
    assert torch.equal(restored[3, 256:], torch.zeros(256))
    for row, constant in ((1, 0.37), (2, -2.5)):
        # Only the fp16 scale's rounding separates a constant row from its value.
        assert torch.allclose(restored[row], torch.full((512,), constant), rtol=2**-10, atol=0)
    for row, column in ((4, 0), (5, 256), (6, 7)):
        assert abs(restored[row, column] - rows[row, column]) < 0.05 * abs(rows[row, column])
    assert_nearest_levels(blocks, type_name, rows)


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_is_row_by_row(type_name):
    quantize = MODULES[type_name].quantize
    values = normal(6, 768, seed=3)
    blocks = quantize(values, type_name)
    assert torch.equal(quantize(values[2:3], type_name), blocks[2:3])
    # Super-blocks are independent: a row is the concatenation of its super-blocks.
    pieces = [quantize(values[:, 256 * k : 256 * (k + 1)], type_name) for k in range(3)]
    assert torch.equal(torch.cat(pieces, dim=1), blocks)


@pytest.mark.parametrize("layout", ["matrix", "rows"])
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_orthogonalize_reference_is_quantize_of_the_float_edit(type_name, layout, scale):
    module = MODULES[type_name]
    blocks, direction = edit_case(type_name, layout)
    before = blocks.clone()
    pointer = blocks.data_ptr()
    expected = module.quantize(edited_float(blocks, type_name, direction, scale, layout), type_name)
    module.orthogonalize_reference_(blocks, type_name, direction, scale, layout=layout)
    assert blocks.data_ptr() == pointer
    assert not torch.equal(blocks, before)
    assert torch.equal(blocks, expected)


# The reference and the fused kernel (through the public entry point), same arguments.
def _reference_edit(blocks, type_name, *args, **kwargs):
    MODULES[type_name].orthogonalize_reference_(blocks, type_name, *args, **kwargs)


EDITS = {"reference": _reference_edit, "kernel": orthogonalize_}
EDIT_CASES = [(type_name, edit) for type_name in TYPES for edit in EDITS]


@pytest.mark.parametrize("layout", ["matrix", "rows"])
@pytest.mark.parametrize(("type_name", "edit"), EDIT_CASES)
def test_orthogonalize_leaves_only_rounding_along_the_direction(type_name, layout, edit):
    dequantize = MODULES[type_name].dequantize
    blocks, direction = edit_case(type_name, layout)
    unit = reference.unit(direction).double()
    target = edited_float(blocks, type_name, direction, 1.0, layout)
    dim = 0 if layout == "matrix" else 1
    component_before = (dequantize(blocks, type_name).double().movedim(dim, -1) @ unit).abs()
    EDITS[edit](blocks, type_name, direction, layout=layout)
    component = (dequantize(blocks, type_name).double().movedim(dim, -1) @ unit).abs()
    float_leftover = (target.double().movedim(dim, -1) @ unit).abs()
    rounding = rounding_bound(blocks, type_name, target).movedim(dim, -1) @ unit.abs()
    assert bool((component <= rounding + float_leftover).all())
    assert component.square().mean() < 0.01 * component_before.square().mean()


# The fused kernel sums c = d^T W (or v . d) in another order than the reference (see
# IDENTICAL_BLOCKS): every value must be within one step of its block, and most blocks identical.
# Measured for Q2_K and Q3_K: all blocks identical in "matrix" and, for Q3_K, in "rows"; 0.991
# (scale 1) and 0.995 (scale 0.5) of Q2_K's in "rows".
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("layout", ["matrix", "rows"])
@pytest.mark.parametrize("type_name", [*KERNEL_TYPES, *sorted(kquants_low.FORMATS)])
def test_kernel_matches_reference(type_name, layout, scale):
    blocks, direction = edit_case(type_name, layout, shape=(65, 16 * kquants.VALUES_PER_BLOCK))
    expected = blocks.clone()
    module_of(type_name).orthogonalize_reference_(expected, type_name, direction, scale, layout)
    orthogonalize_(blocks, type_name, direction, scale, layout)
    assert_gguf_close(blocks, expected, type_name)
    assert identical_block_fraction(blocks, expected, type_name) >= IDENTICAL_BLOCKS[layout]


@pytest.mark.parametrize("layout", ["matrix", "rows"])
@pytest.mark.parametrize("type_name", TYPES)
def test_bad_input_raises_before_writing(type_name, layout):
    calls, direction = bad_calls(type_name, layout)
    for name, error, blocks, arguments in calls:
        keywords = {"type_name": type_name, "direction": direction, "scale": 1.0, "layout": layout, **arguments}
        before = blocks.clone()
        with pytest.raises(error, match=name):
            MODULES[type_name].orthogonalize_reference_(blocks, **keywords)
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
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_rejects_bad_values(values, error, name, type_name):
    module = MODULES[type_name]
    with pytest.raises(error, match=name):
        module.quantize(values, type_name)
    # A type of the other module, or none at all.
    for wrong in ("Q8_K", "Q2_K" if module is kquants else "Q4_K"):
        with pytest.raises(ValueError, match="type_name"):
            module.quantize(torch.ones(2, 256), wrong)
