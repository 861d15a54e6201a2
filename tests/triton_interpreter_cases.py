"""The Triton kernels on CPU tensors under the Triton interpreter, against `reference`.

Run by test_triton_interpreter.py in a child process: TRITON_INTERPRET must be set before the
kernels are defined, and a process that also runs them compiled on a GPU must not see it.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from tolerances import DTYPES, assert_close

from refusal_kernels import reference
from refusal_kernels.backends import triton as triton_backend
from refusal_kernels.backends.triton import ablate as ablate_module
from refusal_kernels.backends.triton._layout import TwoLevelLayout, two_level_layout

SCALES = (1.0, 0.5, 2.0)
# d = 1 and 7: tiny rows packed many to a program; 4097: one padded row per program;
# MAX_WHOLE_ROW + 1: the chunked two-pass path.
ROW_LENGTHS = (1, 7, 4097, ablate_module.MAX_WHOLE_ROW + 1)


def _random(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def _rows_for(d: int) -> int:
    return 3 if d > 1024 else 37


def test_kernels_are_interpreted():
    assert type(ablate_module._ablate_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", ROW_LENGTHS)
def test_ablate_matches_reference(dtype, d):
    x = _random((_rows_for(d), d), dtype)
    direction = _random(d, torch.float32, seed=1)
    for scale in SCALES:
        expected = reference.ablate(x, direction, scale)
        actual = x.clone()
        triton_backend.ablate_(actual, direction, scale)
        assert_close(actual, expected)


@pytest.mark.parametrize("direction_dtype", (torch.float64, torch.bfloat16, torch.float16))
def test_ablate_direction_dtypes(direction_dtype):
    x = _random((5, 33), torch.float32)
    direction = _random(33, direction_dtype, seed=1)
    expected = reference.ablate(x, direction)
    triton_backend.ablate_(x, direction)
    assert_close(x, expected)


def test_ablate_single_vector():
    x = _random(19, torch.bfloat16)
    direction = _random(19, torch.float32, seed=1)
    expected = reference.ablate(x, direction, 0.5)
    triton_backend.ablate_(x, direction, 0.5)
    assert_close(x, expected)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 7), (3, 0)])
def test_ablate_empty(shape):
    x = torch.empty(shape)
    triton_backend.ablate_(x, torch.ones(shape[-1]))
    assert x.shape == shape


# (buffer shape, view of it): rows that are slices of a bigger buffer. The last case needs
# three strides and takes the contiguous round trip.
STRIDED_VIEWS = [
    ((6, 20), lambda b: b[::2, 3:10]),
    ((3, 5, 40), lambda b: b[:, :4, :33]),
    ((4, 3, 40), lambda b: b.transpose(0, 1)[..., 5:38]),
    ((2, 3, 5, 40), lambda b: b[:, :2, :4, :33]),
    ((2, 3, ablate_module.MAX_WHOLE_ROW + 10), lambda b: b[:, 1:, 3:-6]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(STRIDED_VIEWS)))
def test_ablate_strided_rows_leave_the_rest_of_the_buffer(dtype, case):
    buffer_shape, view_of = STRIDED_VIEWS[case]
    buffer = _random(buffer_shape, dtype)
    x = view_of(buffer)
    direction = _random(x.shape[-1], torch.float32, seed=1)
    expected_buffer = buffer.clone()
    view_of(expected_buffer).copy_(reference.ablate(x, direction, 2.0))
    triton_backend.ablate_(x, direction, 2.0)
    assert_close(buffer, expected_buffer)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_directions", (1, 64))
@pytest.mark.parametrize("d", (7, ablate_module.MAX_WHOLE_ROW + 1))
def test_ablate_indexed_per_vector(dtype, num_directions, d):
    batch, tokens = (2, 3) if d > 1024 else (4, 9)
    x = _random((batch, tokens, d), dtype)
    directions = _random((num_directions, d), torch.float32, seed=1)
    index = torch.randint(-1, num_directions, (batch, tokens), generator=torch.Generator().manual_seed(2))
    index[0, 0] = -1
    expected = reference.ablate_indexed(x, directions, index, 0.5)
    triton_backend.ablate_indexed_(x, directions, index, 0.5)
    assert_close(x, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_directions", (1, 64))
def test_ablate_indexed_per_batch_row(dtype, num_directions):
    buffer = _random((5, 6, 40), dtype)
    x = buffer[:, :4, 2:35]  # padded [B, T, d] strides
    directions = _random((num_directions, 33), torch.float32, seed=1)
    index = torch.tensor([0, -1, num_directions - 1, -1, 0])
    expected_buffer = buffer.clone()
    expected_buffer[:, :4, 2:35] = reference.ablate_indexed(x, directions, index, 2.0)
    triton_backend.ablate_indexed_(x, directions, index, 2.0)
    assert_close(buffer, expected_buffer)


def test_ablate_indexed_out_of_range_entries_are_left_untouched():
    x = _random((6, 16), torch.float32)
    directions = _random((3, 16), torch.float32, seed=1)
    index = torch.tensor([0, 3, -2, 1000, 2, -1])
    expected = reference.ablate_indexed(x, directions, index.where((index >= 0) & (index < 3), -1))
    triton_backend.ablate_indexed_(x, directions, index)
    assert_close(x, expected)


def test_ablate_indexed_non_contiguous_index_and_directions():
    x = _random((3, 4, 10), torch.float16)
    directions = _random((10, 8), torch.float32, seed=1).t()  # [8, 10], column-major
    index = torch.randint(-1, 8, (4, 3), generator=torch.Generator().manual_seed(2)).t()
    expected = reference.ablate_indexed(x, directions, index)
    triton_backend.ablate_indexed_(x, directions, index)
    assert_close(x, expected)


def test_ablate_indexed_empty():
    x = torch.empty(0, 4, 8)
    triton_backend.ablate_indexed_(x, torch.ones(2, 8), torch.empty(0, dtype=torch.int64))
    assert x.shape == (0, 4, 8)


# d_model 100 takes two steps of the row loop; d_in 300 spans three strips, the last partial.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(100, 300), (3, 37, 300), (1, 1), (5, 1), (1, 9)])
def test_orthogonalize_matches_reference(dtype, shape):
    weight = _random(shape, dtype)
    direction = _random(shape[-2], torch.float32, seed=1)
    for scale in SCALES:
        expected = reference.orthogonalize(weight, direction, scale)
        actual = weight.clone()
        triton_backend.orthogonalize_(actual, direction, scale)
        assert_close(actual, expected)


# Padded experts (two strides), and a 4-D stack whose leading dims need three strides.
WEIGHT_VIEWS = [
    ((3, 40, 320), lambda b: b[:, :37, 5:305]),
    ((2, 3, 12, 20), lambda b: b[:, ::2, :10, :17]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(WEIGHT_VIEWS)))
def test_orthogonalize_strided_experts(dtype, case):
    buffer_shape, view_of = WEIGHT_VIEWS[case]
    buffer = _random(buffer_shape, dtype)
    weight = view_of(buffer)
    direction = _random(weight.shape[-2], torch.bfloat16, seed=1)
    expected_buffer = buffer.clone()
    view_of(expected_buffer).copy_(reference.orthogonalize(weight, direction, 0.5))
    triton_backend.orthogonalize_(weight, direction, 0.5)
    assert_close(buffer, expected_buffer)


def test_orthogonalize_empty():
    weight = torch.empty(2, 0, 5)
    triton_backend.orthogonalize_(weight, torch.ones(0))
    assert weight.shape == (2, 0, 5)


@pytest.mark.parametrize("axis", ("column", "row"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(100, 300), (3, 37, 300), (1, 1), (5, 1), (1, 9)])
def test_orthogonalize_norm_preserving_matches_reference(axis, dtype, shape):
    weight = _random(shape, dtype)
    direction = _random(shape[-2], torch.float32, seed=1)
    for scale in SCALES:
        expected = reference.orthogonalize_norm_preserving(weight, direction, scale, axis)
        actual = weight.clone()
        triton_backend.orthogonalize_norm_preserving_(actual, direction, scale, axis)
        assert_close(actual, expected)


@pytest.mark.parametrize("axis", ("column", "row"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(WEIGHT_VIEWS)))
def test_orthogonalize_norm_preserving_strided_experts(axis, dtype, case):
    buffer_shape, view_of = WEIGHT_VIEWS[case]
    buffer = _random(buffer_shape, dtype)
    weight = view_of(buffer)
    direction = _random(weight.shape[-2], torch.bfloat16, seed=1)
    expected_buffer = buffer.clone()
    view_of(expected_buffer).copy_(reference.orthogonalize_norm_preserving(weight, direction, 0.5, axis))
    triton_backend.orthogonalize_norm_preserving_(weight, direction, 0.5, axis)
    assert_close(buffer, expected_buffer)


@pytest.mark.parametrize("axis", ("column", "row"))
def test_orthogonalize_norm_preserving_zero_vectors_stay_zero(axis):
    weight = _random((6, 5), torch.float32)
    zero = (slice(None), 2) if axis == "column" else (3, slice(None))
    weight[zero] = 0
    triton_backend.orthogonalize_norm_preserving_(weight, _random(6, torch.float32, seed=1), axis=axis)
    assert torch.isfinite(weight).all()
    assert (weight[zero] == 0).all()


@pytest.mark.parametrize("axis", ("column", "row"))
def test_orthogonalize_norm_preserving_empty(axis):
    weight = torch.empty(2, 0, 5)
    triton_backend.orthogonalize_norm_preserving_(weight, torch.ones(0), axis=axis)
    assert weight.shape == (2, 0, 5)


def test_metadata_is_checked_before_launch():
    with pytest.raises(ValueError, match="stride 1"):
        triton_backend.ablate_(torch.zeros(4, 6).t(), torch.ones(4))
    with pytest.raises(TypeError, match="int64"):
        triton_backend.ablate_indexed_(torch.zeros(2, 4), torch.ones(1, 4), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="d_model"):
        triton_backend.orthogonalize_(torch.zeros(4, 6), torch.ones(6))
    with pytest.raises(ValueError, match="axis"):
        triton_backend.orthogonalize_norm_preserving_(torch.zeros(4, 6), torch.ones(4), axis="diagonal")


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (torch.empty(5, 7), TwoLevelLayout(5, 0, 7)),
        (torch.empty(2, 3, 5, 7), TwoLevelLayout(30, 0, 7)),
        (torch.empty(3, 5, 40)[:, :4], TwoLevelLayout(4, 200, 40)),
        (torch.empty(1, 4, 1, 3, 9)[:, ::2], TwoLevelLayout(3, 54, 9)),
        (torch.empty(9), TwoLevelLayout(1, 0, 0)),
    ],
)
def test_two_level_layout(view, expected):
    assert two_level_layout(view, 1) == expected


def test_two_level_layout_gives_up_on_three_strides():
    assert two_level_layout(torch.empty(2, 3, 5, 40)[:, :2, :4], 1) is None
