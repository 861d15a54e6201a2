"""How the ops sit in PyTorch: opcheck (schema, fake kernels, autograd), torch.compile."""

import pytest
import torch

import refusal_kernels as rk
from refusal_kernels import reference


def sample_ablate():
    return (torch.randn(3, 5, 8), torch.randn(8), 0.5)


def sample_ablate_indexed():
    return (torch.randn(3, 5, 8), torch.randn(4, 8), torch.tensor([0, -1, 3]), 1.0)


def sample_orthogonalize():
    return (torch.randn(2, 8, 6), torch.randn(8), 1.0)


def sample_norm_preserving_columns():
    return (torch.randn(2, 8, 6), torch.randn(8), 1.0, "column")


def sample_norm_preserving_rows():
    return (torch.randn(8, 6), torch.randn(8), 0.5, "row")


@pytest.mark.parametrize(
    ("op", "sample"),
    [
        (torch.ops.refusal.ablate.default, sample_ablate),
        (torch.ops.refusal.ablate_indexed.default, sample_ablate_indexed),
        (torch.ops.refusal.orthogonalize.default, sample_orthogonalize),
        (torch.ops.refusal.orthogonalize_norm_preserving.default, sample_norm_preserving_columns),
        (torch.ops.refusal.orthogonalize_norm_preserving.default, sample_norm_preserving_rows),
        (torch.ops.refusal.ablated.default, sample_ablate),
    ],
)
def test_opcheck(op, sample):
    torch.library.opcheck(op, sample())


def test_opcheck_autograd_of_ablated():
    x, direction, scale = sample_ablate()
    torch.library.opcheck(torch.ops.refusal.ablated.default, (x.requires_grad_(), direction, scale))


@pytest.mark.parametrize(
    ("inplace", "expected", "sample"),
    [
        (rk.ablate_, reference.ablate, sample_ablate),
        (rk.ablate_indexed_, reference.ablate_indexed, sample_ablate_indexed),
        (rk.orthogonalize_, reference.orthogonalize, sample_orthogonalize),
        (rk.orthogonalize_norm_preserving_, reference.orthogonalize_norm_preserving, sample_norm_preserving_columns),
        (rk.orthogonalize_norm_preserving_, reference.orthogonalize_norm_preserving, sample_norm_preserving_rows),
    ],
)
def test_inside_torch_compile_fullgraph(inplace, expected, sample):
    torch._dynamo.reset()
    args = sample()
    target = args[0]
    want = expected(*args)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(*call_args):
        inplace(*call_args)
        return call_args[0] * 2

    out = step(*args)
    torch.testing.assert_close(target, want)
    torch.testing.assert_close(out, want * 2)


def test_out_of_place_ablate_compiles_with_inductor():
    torch._dynamo.reset()
    x, direction, scale = sample_ablate()
    compiled = torch.compile(lambda t: rk.ablate(t, direction, scale) + 1, fullgraph=True)
    torch.testing.assert_close(compiled(x), reference.ablate(x, direction, scale) + 1)
