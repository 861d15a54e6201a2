"""The Triton kernels on CPU tensors under the Triton interpreter, against `reference`: every
sample of tests/op_samples.py small enough to interpret, then the Triton launcher's own cases.

Run by test_backends_triton.py in a child process: TRITON_INTERPRET must be set before the
kernels are defined, and a process that also runs them compiled on a GPU must not see it.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from op_samples import SAMPLES, check
from tolerances import DTYPES, assert_close

from refusal_kernels import reference
from refusal_kernels.backends import triton as triton_backend
from refusal_kernels.backends.triton import ablate as ablate_module
from refusal_kernels.backends.triton._layout import TwoLevelLayout, two_level_layout


def _random(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.interpret], ids=str)
def test_matches_reference(sample, dtype):
    check("triton", sample, "cpu", dtype)


def test_the_samples_reach_the_chunked_row_path():
    # Rows longer than MAX_WHOLE_ROW take the two-pass path; the table must hold one.
    assert any(s.op == "ablate" and s.interpret and s.target_shape[-1] > ablate_module.MAX_WHOLE_ROW for s in SAMPLES)


def test_kernels_are_interpreted():
    assert type(ablate_module._ablate_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 7), (3, 0)])
def test_ablate_empty(shape):
    x = torch.empty(shape)
    triton_backend.ablate_(x, torch.ones(shape[-1]))
    assert x.shape == shape


def test_ablate_indexed_out_of_range_entries_are_left_untouched():
    x = _random((6, 16), torch.float32)
    directions = _random((3, 16), torch.float32, seed=1)
    index = torch.tensor([0, 3, -2, 1000, 2, -1])
    expected = reference.ablate_indexed(x, directions, index.where((index >= 0) & (index < 3), -1))
    triton_backend.ablate_indexed_(x, directions, index)
    assert_close(x, expected)


def test_ablate_indexed_empty():
    x = torch.empty(0, 4, 8)
    triton_backend.ablate_indexed_(x, torch.ones(2, 8), torch.empty(0, dtype=torch.int64))
    assert x.shape == (0, 4, 8)


def test_orthogonalize_empty():
    weight = torch.empty(2, 0, 5)
    triton_backend.orthogonalize_(weight, torch.ones(0))
    assert weight.shape == (2, 0, 5)


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
