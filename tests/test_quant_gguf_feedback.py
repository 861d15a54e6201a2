"""orthogonalize_with_feedback_: feedback passes take out the component that requantization keeps.

The blocks are random weights quantized once, as a GGUF stores them, so every value starts on
its block's grid: the case where a plain requantization rounds much of the edit away. Where the
plain edit already leaves no more than a memoryless rounding would (about the relative error,
as Q8_0 and Q6_K do), the passes have nothing to take out.
"""

import pytest
import torch

from refusal_kernels.quant import gguf as blocks
from refusal_kernels.quant.gguf.feedback import orthogonalize_with_feedback_

TYPES = ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K"]


def _case(type_name: str, layout: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # d_model 1024, as in small real models: each value's share of the removed component is small.
    rows, cols = (1024, 256) if layout == "matrix" else (300, 1024)
    stored = blocks.quantize(torch.randn(rows, cols, generator=generator) * 0.02, type_name)
    direction = torch.randn(rows if layout == "matrix" else cols, generator=generator)
    return stored, direction / direction.norm()


def _along(values: torch.Tensor, unit: torch.Tensor, layout: str) -> torch.Tensor:
    return unit @ values if layout == "matrix" else values @ unit


def _edit(stored, type_name, unit, layout, passes, scale=1.0):
    edited = stored.clone()
    orthogonalize_with_feedback_(edited, type_name, unit, scale, layout, passes)
    return blocks.dequantize(edited, type_name)


@pytest.mark.parametrize("layout", ["matrix", "rows"])
@pytest.mark.parametrize("type_name", TYPES)
def test_feedback_shrinks_the_stored_component_and_barely_moves_the_error(type_name, layout):
    stored, unit = _case(type_name, layout)
    original = blocks.dequantize(stored, type_name)
    component = _along(original, unit, layout).norm()
    fp32_edit = original - (
        torch.outer(unit, unit @ original) if layout == "matrix" else torch.outer(original @ unit, unit)
    )
    left, error = {}, {}
    for passes in (0, 2):
        edited = _edit(stored, type_name, unit, layout, passes)
        left[passes] = float(_along(edited, unit, layout).norm() / component)
        error[passes] = float((edited - fp32_edit).norm() / fp32_edit.norm())
    # What a rounding with no memory of the old grid would leave: about the relative error.
    floor = 1.5 * error[0]
    assert left[2] < max(0.6 * left[0], floor), (left, error)
    assert error[2] < 1.4 * error[0], error


def test_zero_passes_is_the_plain_edit_and_a_scale_keeps_its_share():
    stored, unit = _case("Q4_K", "matrix")
    plain = stored.clone()
    blocks.orthogonalize_(plain, "Q4_K", unit)
    zero = stored.clone()
    orthogonalize_with_feedback_(zero, "Q4_K", unit, passes=0)
    assert torch.equal(zero, plain)
    original = blocks.dequantize(stored, "Q4_K")
    half = _along(_edit(stored, "Q4_K", unit, "matrix", passes=3, scale=0.5), unit, "matrix")
    kept = half.norm() / (unit @ original).norm()
    assert 0.4 < kept < 0.6


@pytest.mark.parametrize("passes", [-1, 1.5, True, "2"])
def test_a_bad_pass_count_is_a_value_error_and_writes_nothing(passes):
    stored, unit = _case("Q8_0", "matrix")
    before = stored.clone()
    with pytest.raises(ValueError, match="passes must be a non-negative int"):
        orthogonalize_with_feedback_(stored, "Q8_0", unit, passes=passes)
    assert torch.equal(stored, before)


def test_a_bad_direction_raises_before_anything_is_written():
    stored, _ = _case("Q8_0", "matrix")
    before = stored.clone()
    with pytest.raises(ValueError, match="direction"):
        orthogonalize_with_feedback_(stored, "Q8_0", torch.randn(7), passes=2)
    assert torch.equal(stored, before)
