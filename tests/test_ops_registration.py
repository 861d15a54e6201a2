"""How the ops sit in PyTorch: opcheck (schema, fake kernels, autograd) and torch.compile, on the
samples of tests/op_samples.py."""

import pytest
import torch
from op_samples import SAMPLES, api, assert_buffer_close, make

import refusal_kernels as rk
from refusal_kernels import reference


def sample_ablate():
    return (torch.randn(3, 5, 8), torch.randn(8), 0.5)


# Every sample whose target holds elements (opcheck's checks compare non-empty outputs); the
# largest rows only cost time here, since opcheck tests registration, not the kernels' paths.
OPCHECK_SAMPLES = [s for s in SAMPLES if 0 < s.view_of(torch.empty(s.target_shape)).numel() <= 50_000]
# One sample of each op, and the strided ones, inside a compiled graph.
COMPILED_SAMPLES = [
    s for s in SAMPLES if s.name in ("5x7-scale0.3", "per-vector-K64", "7x5", "column-7x5", "row-7x5", "matrix-7x3")
]
COMPILED_SAMPLES += [s for s in SAMPLES if "strided" in s.name or "every-other" in s.name]


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=str)
def test_opcheck(sample):
    args = make(sample, "cpu", torch.float32).args
    torch.library.opcheck(getattr(torch.ops.refusal, sample.op).default, args)


def test_opcheck_of_ablated():
    torch.library.opcheck(torch.ops.refusal.ablated.default, sample_ablate())


def test_opcheck_autograd_of_ablated():
    x, direction, scale = sample_ablate()
    torch.library.opcheck(torch.ops.refusal.ablated.default, (x.requires_grad_(), direction, scale))


@pytest.mark.parametrize("sample", COMPILED_SAMPLES, ids=str)
def test_inside_torch_compile_fullgraph(sample):
    torch._dynamo.reset()
    inputs = make(sample, "cpu", torch.float32)
    want = inputs.expected_buffer(sample.op)
    inplace = api(sample.op)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(*call_args):
        inplace(*call_args)
        return call_args[0] * 2

    out = step(*inputs.args)
    assert_buffer_close(sample.op, inputs.buffer, want)
    # The graph reads the target after the op wrote it.
    torch.testing.assert_close(out, inputs.view_of(inputs.buffer) * 2)


def test_out_of_place_ablate_compiles_with_inductor():
    torch._dynamo.reset()
    x, direction, scale = sample_ablate()
    compiled = torch.compile(lambda t: rk.ablate(t, direction, scale) + 1, fullgraph=True)
    torch.testing.assert_close(compiled(x), reference.ablate(x, direction, scale) + 1)
