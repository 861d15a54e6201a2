"""The legacy GGUF block formats against the gguf package's numpy port of llama.cpp, and the
dequantize-orthogonalize-requantize reference on their blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from op_samples import IDENTICAL_BLOCKS, assert_gguf_close, identical_block_fraction

from refusal_kernels import reference
from refusal_kernels.quant.gguf import LAYOUTS, legacy, orthogonalize_

TYPE_NAMES = list(legacy.FORMATS)
ROWS, COLS = 40, 96


def _gguf_type(type_name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[type_name]


def _gguf_quantize(values: torch.Tensor, type_name: str) -> torch.Tensor:
    with np.errstate(all="ignore"):  # overflowing fp16 scales are part of the data
        return torch.from_numpy(gguf.quants.quantize(values.numpy(), _gguf_type(type_name)))


def _gguf_dequantize(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    with np.errstate(all="ignore"):
        return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), _gguf_type(type_name)))


def _assert_same_floats(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit, except that any NaN matches any NaN (payloads are not part of the formats)."""
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan())
    kept = ~expected.isnan()
    assert torch.equal(actual[kept].view(torch.int32), expected[kept].view(torch.int32))


def _halves(generator: torch.Generator) -> torch.Tensor:
    # Each block opens with 127, so Q8_0's d is 1 and every other element is a rounding tie.
    values = torch.randint(-100, 100, (8, COLS), generator=generator) + 0.5
    values[:, :: legacy.BLOCK_VALUES] = 127
    return values


def _ties(generator: torch.Generator) -> torch.Tensor:
    # +1.5 and -1.5 share the largest magnitude; the first one in the block sets the sign of d.
    values = 0.1 * torch.randn(8, COLS, generator=generator)
    values[:, 5 :: legacy.BLOCK_VALUES] = 1.5
    values[:, 20 :: legacy.BLOCK_VALUES] = -1.5
    values[::2] = -values[::2]
    return values


def _one_outlier(generator: torch.Generator) -> torch.Tensor:
    values = 0.01 * torch.randn(8, COLS, generator=generator)
    values[torch.arange(8), torch.randint(0, COLS, (8,), generator=generator)] = 50.0 * torch.tensor([1, -1] * 4)
    return values


DATA = {
    "random": lambda g: torch.randn(8, COLS, generator=g),
    "all-zero rows": lambda g: torch.zeros(8, COLS),
    "constant rows": lambda g: (torch.arange(8.0) - 3.5)[:, None].expand(8, COLS) * 0.3,
    "huge": lambda g: 3e4 * torch.randn(8, COLS, generator=g),
    "beyond fp16 (d or m overflow)": lambda g: 1e6 * torch.randn(8, COLS, generator=g),
    "tiny (subnormal fp16 d)": lambda g: 1e-4 * torch.randn(8, COLS, generator=g),
    "vanishing (d rounds to 0)": lambda g: 1e-20 * torch.randn(8, COLS, generator=g),
    "one outlier per row": _one_outlier,
    "ties for the largest magnitude": _ties,
    "rounding ties": _halves,
}


def _data(case: str) -> torch.Tensor:
    return DATA[case](torch.Generator().manual_seed(sorted(DATA).index(case))).contiguous()


def test_formats_match_gguf_sizes():
    for type_name, sizes in legacy.FORMATS.items():
        assert sizes == gguf.GGML_QUANT_SIZES[_gguf_type(type_name)]


@pytest.mark.parametrize("case", DATA)
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_quantize_matches_gguf_byte_for_byte(type_name, case):
    values = _data(case)
    blocks = legacy.quantize(values, type_name)
    assert blocks.dtype == torch.uint8
    assert torch.equal(blocks, _gguf_quantize(values, type_name))


@pytest.mark.parametrize("case", DATA)
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_dequantize_matches_gguf_exactly(type_name, case):
    blocks = _gguf_quantize(_data(case), type_name)
    _assert_same_floats(legacy.dequantize(blocks, type_name), _gguf_dequantize(blocks, type_name))


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_dequantize_matches_gguf_on_arbitrary_bytes(type_name):
    # Every bit pattern of the quants, and scales that are NaN, infinite or subnormal.
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (ROWS, 4 * legacy.FORMATS[type_name][1]), generator=generator, dtype=torch.uint8)
    _assert_same_floats(legacy.dequantize(blocks, type_name), _gguf_dequantize(blocks, type_name))


# ---- orthogonalize_reference_


def _problem(type_name: str, layout: str, rows: int = ROWS, cols: int = COLS) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [rows, bytes] with a strong component along a random direction, and that direction."""
    generator = torch.Generator().manual_seed(TYPE_NAMES.index(type_name))
    direction = torch.randn(rows if layout == "matrix" else cols, generator=generator)
    unit = reference.unit(direction)
    strength = 10 + 10 * torch.rand(cols if layout == "matrix" else rows, generator=generator)
    along = torch.outer(unit, strength) if layout == "matrix" else torch.outer(strength, unit)
    weight = torch.randn(rows, cols, generator=generator) + along
    return _gguf_quantize(weight, type_name), direction


def _component(t: torch.Tensor, unit: torch.Tensor, layout: str) -> torch.Tensor:
    """d . w for every column w of t (matrix layout) or every row (rows layout)."""
    return unit @ t if layout == "matrix" else t @ unit


# How far a requantized element can land from its fp32 value, in units of its block's |d|:
# half a step, plus the fp16 rounding of d times up to 31 (Q8_0: 127) levels, and a full
# step for Q4_0 / Q5_0, whose top level clamps the element opposite the block's max.
STEPS = {"Q4_0": 1.02, "Q5_0": 1.02, "Q4_1": 0.6, "Q5_1": 0.6, "Q8_0": 0.6}
# Q4_1 / Q5_1 also store m in fp16, off by at most 2^-11 of it.
M_ROUNDING = 2.0**-10


def _rounding_bound(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """Per element [rows, row_length], the most requantization can move it, from its block's d and m."""
    fields = blocks.reshape(blocks.shape[0], -1, legacy.FORMATS[type_name][1])
    bound = STEPS[type_name] * fields[..., 0:2].contiguous().view(torch.float16).float().abs()
    if type_name in ("Q4_1", "Q5_1"):
        bound = bound + M_ROUNDING * fields[..., 2:4].contiguous().view(torch.float16).float().abs()
    return bound.repeat_interleave(legacy.BLOCK_VALUES, dim=-1).reshape(blocks.shape[0], -1)


# The reference and the fused kernel (through the public entry point), same arguments.
EDITS = {"reference": legacy.orthogonalize_reference_, "kernel": orthogonalize_}


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_orthogonalize_leaves_only_rounding_along_direction(type_name, layout, edit):
    blocks, direction = _problem(type_name, layout)
    unit = reference.unit(direction)
    before = _component(legacy.dequantize(blocks, type_name), unit, layout)
    EDITS[edit](blocks, type_name, direction, layout=layout)
    after = _component(legacy.dequantize(blocks, type_name), unit, layout)
    bound = _component(_rounding_bound(blocks, type_name), unit.abs(), layout) + 1e-4
    assert (after.abs() <= bound).all(), (after.abs() - bound).max()
    assert (before.abs() > bound).all(), "the data must hold a component the bound would catch"


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_orthogonalize_is_requantized_dense_reference_in_place(type_name, layout, scale):
    blocks, direction = _problem(type_name, layout)
    dense = _gguf_dequantize(blocks, type_name)
    updated = (
        reference.orthogonalize(dense, direction, scale)
        if layout == "matrix"
        else reference.ablate(dense, direction, scale)
    )
    expected = _gguf_quantize(updated, type_name)
    assert not torch.equal(expected, blocks)
    alias = blocks.view(-1)
    legacy.orthogonalize_reference_(blocks, type_name, direction, scale, layout)
    assert torch.equal(blocks, expected)
    assert torch.equal(alias, expected.view(-1)), "the bytes must be written into the same storage"


# The fused kernel sums c = d^T W (or v . d) in another order than the reference (see
# IDENTICAL_BLOCKS): every value must be within one step of its block, and most blocks identical.
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_kernel_matches_reference(type_name, layout, scale):
    blocks, direction = _problem(type_name, layout, rows=257, cols=65 * legacy.BLOCK_VALUES)
    expected = blocks.clone()
    legacy.orthogonalize_reference_(expected, type_name, direction, scale, layout)
    orthogonalize_(blocks, type_name, direction, scale, layout)
    assert_gguf_close(blocks, expected, type_name)
    assert identical_block_fraction(blocks, expected, type_name) >= IDENTICAL_BLOCKS[layout]


# ---- bad input

# name: (the arguments to change, from (blocks, direction), error, what the message starts with)
BAD_ARGUMENTS = {
    "unknown type name": (lambda b, d: {"type_name": "Q4_2"}, ValueError, "type_name"),
    "a k-quant type name": (lambda b, d: {"type_name": "Q4_K"}, ValueError, "type_name"),
    "float blocks": (lambda b, d: {"blocks": b.float()}, TypeError, "blocks"),
    "1-D blocks": (lambda b, d: {"blocks": b.view(-1)}, ValueError, "blocks must be 2-D"),
    "non-contiguous blocks": (lambda b, d: {"blocks": b[:, ::2]}, ValueError, "blocks must be contiguous"),
    "a partial block per row": (
        lambda b, d: {"blocks": b.view(-1)[: ROWS * 71].view(ROWS, 71)},
        ValueError,
        "blocks has 71 bytes per row",
    ),
    "direction too short": (lambda b, d: {"direction": d[:-1]}, ValueError, "direction"),
    "matrix layout, direction over a row": (lambda b, d: {"direction": torch.ones(COLS)}, ValueError, "direction"),
    "rows layout, direction over the rows": (lambda b, d: {"layout": "rows"}, ValueError, "direction"),
    "2-D direction": (lambda b, d: {"direction": d[None]}, ValueError, "direction"),
    "integer direction": (lambda b, d: {"direction": torch.ones(ROWS, dtype=torch.int64)}, TypeError, "direction"),
    "zero direction": (lambda b, d: {"direction": torch.zeros(ROWS)}, ValueError, "direction"),
    "NaN direction": (lambda b, d: {"direction": torch.full((ROWS,), float("nan"))}, ValueError, "direction"),
    "zero direction, rows layout": (
        lambda b, d: {"direction": torch.zeros(COLS), "layout": "rows"},
        ValueError,
        "direction",
    ),
    "infinite direction, rows layout": (
        lambda b, d: {"direction": torch.full((COLS,), float("inf")), "layout": "rows"},
        ValueError,
        "direction",
    ),
    "NaN scale": (lambda b, d: {"scale": float("nan")}, ValueError, "scale"),
    "infinite scale": (lambda b, d: {"scale": float("inf")}, ValueError, "scale"),
    "unknown layout": (lambda b, d: {"layout": "columns"}, ValueError, "layout"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_orthogonalize_bad_arguments_raise_before_writing(case):
    changes, error, message = BAD_ARGUMENTS[case]
    blocks, direction = _problem("Q5_1", "matrix")
    arguments = {"blocks": blocks, "type_name": "Q5_1", "direction": direction, "scale": 1.0, "layout": "matrix"}
    arguments |= changes(blocks, direction)
    passed = arguments["blocks"].clone()
    original = blocks.clone()
    with pytest.raises(error, match="^" + message):
        legacy.orthogonalize_reference_(**arguments)
    assert torch.equal(arguments["blocks"], passed)
    assert torch.equal(blocks, original)


BAD_CONVERSIONS = {
    "dequantize: unknown type name": (
        lambda: legacy.dequantize(torch.zeros(2, 18, dtype=torch.uint8), "F16"),
        ValueError,
        "type_name",
    ),
    "dequantize: float blocks": (lambda: legacy.dequantize(torch.zeros(2, 18), "Q4_0"), TypeError, "blocks"),
    "dequantize: a partial block": (
        lambda: legacy.dequantize(torch.zeros(2, 19, dtype=torch.uint8), "Q4_0"),
        ValueError,
        "blocks",
    ),
    "quantize: unknown type name": (lambda: legacy.quantize(torch.zeros(2, 32), "q4_0"), ValueError, "type_name"),
    "quantize: integer values": (
        lambda: legacy.quantize(torch.zeros(2, 32, dtype=torch.int32), "Q4_0"),
        TypeError,
        "values",
    ),
    "quantize: 1-D values": (lambda: legacy.quantize(torch.zeros(32), "Q4_0"), ValueError, "values"),
    "quantize: a partial block": (lambda: legacy.quantize(torch.zeros(2, 48), "Q8_0"), ValueError, "values"),
}


@pytest.mark.parametrize("case", BAD_CONVERSIONS)
def test_conversion_bad_arguments(case):
    call, error, message = BAD_CONVERSIONS[case]
    with pytest.raises(error, match="^" + message):
        call()
