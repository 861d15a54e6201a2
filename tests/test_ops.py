"""The public ops against the pure-torch reference: odd shapes, strides, every dtype."""

import pytest
import torch
from tolerances import DTYPES, TOLERANCES, assert_close

import refusal_kernels as rk
from refusal_kernels import reference


def strided_rows(shape, dtype, pad=3):
    """A tensor of `shape` whose rows are slices of a wider buffer (non-contiguous)."""
    buffer = torch.randn(*shape[:-1], shape[-1] + pad, dtype=dtype)
    return buffer[..., pad // 2 : pad // 2 + shape[-1]]


ABLATE_SHAPES = [(1, 1), (5, 7), (3, 4097), (2, 3, 4, 5, 6, 7), (0, 16), (2, 0, 9), (9,)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ABLATE_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 0.3, 2.0])
def test_ablate_matches_reference(dtype, shape, scale):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    direction = torch.randn(shape[-1], dtype=torch.float64)
    expected = reference.ablate(x, direction, scale)
    assert rk.ablate_(x, direction, scale) is x
    assert_close(x, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ablate_strided_rows(dtype):
    torch.manual_seed(0)
    x = strided_rows((4, 6, 33), dtype)[:, ::2]  # gaps between rows at two levels
    before = x._base.clone()
    direction = torch.randn(33, dtype=dtype)
    expected = reference.ablate(x, direction)
    rk.ablate_(x, direction)
    assert_close(x, expected)
    untouched = torch.ones_like(before, dtype=torch.bool)
    untouched[:, ::2, 1:34] = False  # only x's elements may change
    assert torch.equal(x._base[untouched], before[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_directions", [1, 64])
@pytest.mark.parametrize("per_batch_row", [False, True])
def test_ablate_indexed_matches_reference(dtype, num_directions, per_batch_row):
    torch.manual_seed(0)
    x = strided_rows((6, 5, 37), dtype)
    directions = torch.randn(num_directions, 37)
    index_shape = x.shape[:1] if per_batch_row else x.shape[:-1]
    index = torch.randint(-1, num_directions, index_shape)
    index.view(-1)[0] = -1
    expected = reference.ablate_indexed(x, directions, index)
    rk.ablate_indexed_(x, directions, index)
    assert_close(x, expected)


def test_ablate_indexed_skips_minus_one():
    x = torch.randn(4, 8)
    before = x.clone()
    rk.ablate_indexed_(x, torch.randn(2, 8), torch.tensor([-1, 0, -1, 1]))
    assert torch.equal(x[[0, 2]], before[[0, 2]])
    assert not torch.equal(x[[1, 3]], before[[1, 3]])


def test_ablate_indexed_equals_ablate_per_row():
    torch.manual_seed(0)
    directions = torch.randn(3, 16)
    x = torch.randn(3, 5, 16)
    expected = torch.stack([rk.ablate(x[k], directions[k]) for k in range(3)])
    rk.ablate_indexed_(x, directions, torch.arange(3))
    torch.testing.assert_close(x, expected)


ORTHOGONALIZE_SHAPES = [(1, 1), (7, 5), (33, 4097), (3, 9, 17), (2, 2, 4, 6), (5, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ORTHOGONALIZE_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_orthogonalize_matches_reference(dtype, shape, scale):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=dtype)
    direction = torch.randn(shape[-2], dtype=torch.float16)
    expected = reference.orthogonalize(weight, direction, scale)
    assert rk.orthogonalize_(weight, direction, scale) is weight
    assert_close(weight, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonalize_strided_experts(dtype):
    torch.manual_seed(0)
    experts = strided_rows((4, 19, 23), dtype)[::2]  # every other expert, padded rows
    direction = torch.randn(19)
    expected = reference.orthogonalize(experts, direction)
    rk.orthogonalize_(experts, direction)
    assert_close(experts, expected)


NORM_AXES = ("column", "row")


@pytest.mark.parametrize("axis", NORM_AXES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ORTHOGONALIZE_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_orthogonalize_norm_preserving_matches_reference(axis, dtype, shape, scale):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=dtype)
    direction = torch.randn(shape[-2], dtype=torch.float16)
    expected = reference.orthogonalize_norm_preserving(weight, direction, scale, axis)
    assert rk.orthogonalize_norm_preserving_(weight, direction, scale, axis) is weight
    assert_close(weight, expected)


@pytest.mark.parametrize("axis", NORM_AXES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonalize_norm_preserving_strided_experts(axis, dtype):
    torch.manual_seed(0)
    experts = strided_rows((4, 19, 23), dtype)[::2]
    before = experts._base.clone()
    direction = torch.randn(19)
    expected = reference.orthogonalize_norm_preserving(experts, direction, 0.5, axis)
    rk.orthogonalize_norm_preserving_(experts, direction, 0.5, axis)
    assert_close(experts, expected)
    untouched = torch.ones_like(before, dtype=torch.bool)
    untouched[::2, :, 1:24] = False  # only the experts' elements may change
    assert torch.equal(experts._base[untouched], before[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_preserving_columns_keep_their_norms_and_lose_the_direction(dtype):
    torch.manual_seed(0)
    weight = torch.randn(3, 64, 300, dtype=dtype)
    direction = torch.randn(64)
    norms = weight.float().norm(dim=-2)
    rk.orthogonalize_norm_preserving_(weight, direction)
    torch.testing.assert_close(weight.float().norm(dim=-2), norms, **TOLERANCES[dtype])
    # Rounding W to its dtype moves each column by at most rtol of its norm.
    along = reference.unit(direction) @ weight.float()
    assert (along.abs() <= TOLERANCES[dtype]["rtol"] * norms).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_norm_preserving_rows_keep_their_norms(dtype, scale):
    torch.manual_seed(0)
    weight = torch.randn(64, 300, dtype=dtype)
    norms = weight.float().norm(dim=-1)
    rk.orthogonalize_norm_preserving_(weight, torch.randn(64), scale, "row")
    torch.testing.assert_close(weight.float().norm(dim=-1), norms, **TOLERANCES[dtype])


@pytest.mark.parametrize("axis", NORM_AXES)
def test_norm_preserving_zero_vectors_stay_zero(axis):
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    zero = (slice(None), 2) if axis == "column" else (3, slice(None))
    weight[zero] = 0
    rk.orthogonalize_norm_preserving_(weight, torch.randn(6), axis=axis)
    assert torch.isfinite(weight).all()
    assert (weight[zero] == 0).all()


def test_norm_preserving_columns_that_the_update_empties_become_zero():
    weight = torch.randn(1, 5)  # d_model 1: every column lies along the direction
    rk.orthogonalize_norm_preserving_(weight, torch.tensor([-3.0]))
    assert torch.equal(weight, torch.zeros(1, 5))


def test_norm_preserving_rows_that_the_update_empties_become_zero():
    weight = torch.randn(4, 1)  # the row-normalized matrix is sign(W), which the direction spans
    rk.orthogonalize_norm_preserving_(weight, weight[:, 0].sign(), axis="row")
    assert torch.equal(weight, torch.zeros(4, 1))


def test_out_of_place_ablate_leaves_input():
    x = strided_rows((3, 8), torch.float32)
    direction = torch.randn(8)
    before = x.clone()
    out = rk.ablate(x, direction)
    assert torch.equal(x, before)
    assert out.is_contiguous()
    assert_close(out, reference.ablate(x, direction))


def test_ablate_gradient_is_ablated_gradient():
    torch.manual_seed(0)
    direction = torch.randn(10)
    x = torch.randn(4, 10, requires_grad=True)
    upstream = torch.randn(4, 10)
    (rk.ablate(x, direction) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, reference.ablate(upstream, direction))
