"""The public ops against the pure-torch reference: every sample of tests/op_samples.py (odd
shapes, strides, empty tensors, every dtype) on each CPU entry point, then properties."""

import pytest
import torch
from op_samples import CPU_BACKENDS, SAMPLES, api, check, make
from tolerances import DTYPES, TOLERANCES, assert_close

import refusal_kernels as rk
from refusal_kernels import reference

NORM_AXES = rk._checks.NORM_AXES


def strided_rows(shape, dtype, pad=3):
    """A tensor of `shape` whose rows are slices of a wider buffer (non-contiguous)."""
    buffer = torch.randn(*shape[:-1], shape[-1] + pad, dtype=dtype)
    return buffer[..., pad // 2 : pad // 2 + shape[-1]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sample", SAMPLES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_reference(backend, sample, dtype):
    check(backend, sample, "cpu", dtype)


@pytest.mark.parametrize("op", sorted({sample.op for sample in SAMPLES}))
def test_in_place_ops_return_their_target(op):
    sample = next(s for s in SAMPLES if s.op == op)
    args = make(sample, "cpu", torch.float32).args
    assert api(op)(*args) is args[0]


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
