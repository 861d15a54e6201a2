"""Every op on every GPU backend against `reference` (the samples of tests/op_samples.py), inside
torch.compile(fullgraph=True), in CUDA graphs; the quantized ops in tests/test_quant_gpu.py."""

import importlib.util

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU backends cannot run", allow_module_level=True)

from op_samples import SAMPLES, api, assert_buffer_close, check, make
from test_ops_registration import COMPILED_SAMPLES
from tolerances import DTYPES, assert_close

import refusal_kernels
from refusal_kernels import backends, reference

GPU_BACKENDS = (
    (("cuda",) if backends.has_cuda_kernels() else ())
    + (("triton",) if importlib.util.find_spec("triton") else ())
    + ("torch",)
)
FUSED_BACKENDS = tuple(b for b in GPU_BACKENDS if b != "torch")


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    refusal_kernels.set_backend(request.param)
    yield request.param
    refusal_kernels.set_backend(None)


def _random(shape, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=generator, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sample", SAMPLES, ids=str)
def test_matches_reference(backend, sample, dtype):
    check("api", sample, "cuda", dtype)


@pytest.mark.parametrize("sample", COMPILED_SAMPLES, ids=str)
def test_every_op_inside_torch_compile_fullgraph(backend, sample):
    torch._dynamo.reset()
    inputs = make(sample, "cuda", torch.float32)
    want = inputs.expected_buffer(sample.op)
    inplace = api(sample.op)

    @torch.compile(fullgraph=True)
    def step(*call_args):
        inplace(*call_args)
        return call_args[0] * 2

    out = step(*inputs.args)
    assert_buffer_close(sample.op, inputs.buffer, want)
    # The graph reads the target after the op wrote it.
    torch.testing.assert_close(out, inputs.view_of(inputs.buffer) * 2)


@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_ablate_indexed_out_of_range_is_left_untouched(name):
    # The public wrapper rejects such an index; the kernels themselves must not fault on it.
    refusal_kernels.set_backend(name)
    try:
        x = _random((6, 16), torch.float32)
        directions = _random((3, 16), torch.float32, seed=1)
        index = torch.tensor([0, 3, -2, 1 << 40, 2, -1], device="cuda")
        expected = reference.ablate_indexed(x, directions, index.where((index >= 0) & (index < 3), -1))
        torch.ops.refusal.ablate_indexed(x, directions, index)
        torch.cuda.synchronize()
        assert_close(x, expected)
    finally:
        refusal_kernels.set_backend(None)


@pytest.mark.skipif(len(FUSED_BACKENDS) < 2, reason="needs both the CUDA and the Triton kernels")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_and_triton_agree(dtype):
    x = _random((33, 3, 5000), dtype)
    weight = _random((2, 640, 1500), dtype)
    directions = _random((4, 5000), torch.float32, seed=1)
    index = torch.tensor([1, -1, 3], device="cuda").repeat(33, 1)
    results = []
    for name in ("cuda", "triton"):
        refusal_kernels.set_backend(name)
        try:
            outputs = (x.clone(), x.clone(), weight.clone())
            refusal_kernels.ablate_(outputs[0], directions[0], 0.5)
            refusal_kernels.ablate_indexed_(outputs[1], directions, index)
            refusal_kernels.orthogonalize_(outputs[2], directions[0, :640], 2.0)
            results.append(outputs)
        finally:
            refusal_kernels.set_backend(None)
    for cuda_output, triton_output in zip(*results, strict=True):
        assert_close(triton_output, cuda_output)


def test_torch_ops_run_on_cuda_tensors():
    # Either the CUDA C++ kernels or, in a build without them, the Triton kernels.
    x = _random((9, 300), torch.bfloat16)
    direction = _random(300, torch.float32, seed=1)
    expected = reference.ablate(x, direction)
    torch.ops.refusal.ablate(x, direction)
    assert_close(x, expected)


def test_ablate_in_cuda_graph(backend):
    static_x = _random((64, 4096), torch.bfloat16)
    direction = _random(4096, torch.float32, seed=1)
    # Warm up on a side stream (kernel compilation, the one-time direction check) before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        refusal_kernels.ablate_(static_x, direction)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        refusal_kernels.ablate_(static_x, direction)
    for seed in (3, 4):
        fresh = _random((64, 4096), torch.bfloat16, seed=seed)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static_x, reference.ablate(fresh, direction))


class _AblatedMLP(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up = torch.nn.Linear(d, d, device="cuda")
        self.register_buffer("direction", _random(d, torch.float32, seed=1))

    def forward(self, x):
        hidden = self.up(x)
        refusal_kernels.ablate_(hidden, self.direction)
        return torch.relu(hidden) + 1


def test_ablate_under_torch_compile_reduce_overhead(backend):
    torch._dynamo.reset()
    model = _AblatedMLP(256).eval()
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for seed in range(4):
            x = _random((8, 256), torch.float32, seed=seed)
            torch.testing.assert_close(compiled(x).clone(), model(x), rtol=1e-4, atol=1e-4)
