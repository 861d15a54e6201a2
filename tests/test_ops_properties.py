"""Algebraic properties of the ops on random shapes and strides (hypothesis)."""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import refusal_kernels as rk

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def rows_and_direction(draw):
    """A float32 tensor of random leading shape whose rows may be slices of a wider buffer."""
    leading = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    d = draw(st.integers(1, 70))
    pad = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    buffer = torch.randn(*leading, d + pad, generator=generator, dtype=torch.float64).float()
    x = buffer[..., pad : pad + d] if pad else buffer
    direction = torch.randn(d, generator=generator)
    return x, direction


def unit(direction):
    return direction / direction.norm()


@SETTINGS
@given(rows_and_direction())
def test_ablate_removes_the_component(case):
    x, direction = case
    scale_of = x.abs().amax().item() + 1
    rk.ablate_(x, direction)
    assert (x @ unit(direction)).abs().max() <= 1e-5 * scale_of * x.shape[-1] ** 0.5


@SETTINGS
@given(rows_and_direction())
def test_ablate_is_idempotent(case):
    x, direction = case
    rk.ablate_(x, direction)
    once = x.clone()
    rk.ablate_(x, direction)
    torch.testing.assert_close(x, once, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(rows_and_direction())
def test_reflecting_twice_restores(case):
    x, direction = case
    before = x.clone()
    rk.ablate_(x, direction, 2.0)
    rk.ablate_(x, direction, 2.0)
    torch.testing.assert_close(x, before, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(rows_and_direction())
def test_orthogonalize_is_ablate_on_the_transpose(case):
    x, _ = case
    weight = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    direction = torch.randn(weight.shape[0])
    by_columns = rk.ablate(weight.t().contiguous(), direction).t()
    rk.orthogonalize_(weight, direction)
    torch.testing.assert_close(weight, by_columns, rtol=1e-5, atol=1e-5)
    assert (unit(direction) @ weight).abs().max() <= 1e-4 * (1 + weight.abs().amax().item())


@SETTINGS
@given(rows_and_direction(), st.sampled_from(["column", "row"]), st.floats(0.1, 2.0))
# Found by hypothesis: one row along d, a scale just above 1 keeps 1.6 % of it.
@example((torch.tensor([1.5410, -0.2934]), torch.tensor([-2.1788, 0.5684])), "row", 1.015625)
def test_norm_preserving_keeps_the_norms(case, axis, scale):
    x, _ = case
    weight = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    dim = 0 if axis == "column" else 1
    norms = weight.norm(dim=dim)
    direction = torch.randn(weight.shape[0])
    # The fraction f of each vector's norm that the update keeps, before the rescaling: the fp32
    # identity that gives the updated norm, ||v||^2 - (2s - s^2) c^2, loses about 2^-24 / f^2.
    vectors = weight if axis == "column" else weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-30)
    kept_fraction = rk.reference.orthogonalize(vectors, direction, scale).norm(dim=dim) / vectors.norm(dim=dim)
    rk.orthogonalize_norm_preserving_(weight, direction, scale, axis)
    assert torch.isfinite(weight).all()
    # A vector that the update empties (possible for d_model = 1 or d_in = 1) becomes zero.
    after = weight.norm(dim=dim)
    kept = (after - norms).abs() <= 1e-4 * (1 + norms) + 2**-20 * norms / kept_fraction.square()
    assert (kept | (after == 0)).all()


@SETTINGS
@given(rows_and_direction(), st.floats(0.1, 2.0))
def test_norm_preserving_row_ablation_is_the_column_op_on_the_transpose(case, scale):
    # reference.ablate_norm_preserving gives rows (embeddings, biases) what the column form of
    # orthogonalize_norm_preserving_ gives a matrix's columns.
    x, direction = case
    rows = x.reshape(-1, x.shape[-1])
    by_columns = rows.t().clone(memory_format=torch.contiguous_format)
    rk.orthogonalize_norm_preserving_(by_columns, direction, scale, "column")
    expected = rk.reference.ablate_norm_preserving(rows, direction, scale)
    # The kernel finds each updated norm from ||v||^2 - (2s - s^2) c^2, the reference directly:
    # they differ by about 2^-24 / f^2 of the norm, f the fraction of it the update keeps.
    norms = rows.norm(dim=-1, keepdim=True)
    kept_fraction = rk.reference.ablate(rows, direction, scale).norm(dim=-1, keepdim=True) / norms.clamp_min(1e-30)
    bound = 1e-5 * (1 + norms) + 2**-20 * norms / kept_fraction.square().clamp_min(1e-30)
    emptied = (expected == 0).all(-1, keepdim=True) | (by_columns.t() == 0).all(-1, keepdim=True)
    assert (((expected - by_columns.t()).abs() <= bound) | emptied).all()
