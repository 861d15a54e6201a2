"""Every op on every GPU backend against `reference`, plus CUDA graphs and torch.compile."""

import importlib.util

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU backends cannot run", allow_module_level=True)

from tolerances import DTYPES, assert_close

import refusal_kernels
from refusal_kernels import backends, reference

GPU_BACKENDS = (
    (("cuda",) if backends.has_cuda_kernels() else ())
    + (("triton",) if importlib.util.find_spec("triton") else ())
    + ("torch",)
)
FUSED_BACKENDS = tuple(b for b in GPU_BACKENDS if b != "torch")
# 1 and 7: several rows per program or warp; 4097: one padded row; 16385: the chunked paths.
ROW_LENGTHS = (1, 7, 4097, 16385)
SCALES = (1.0, 0.5, 2.0)


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    refusal_kernels.set_backend(request.param)
    yield request.param
    refusal_kernels.set_backend(None)


def _random(shape, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=generator, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", ROW_LENGTHS)
def test_ablate(backend, dtype, d):
    x = _random((67, d), dtype)
    direction = _random(d, torch.float32, seed=1)
    for scale in SCALES:
        actual = x.clone()
        refusal_kernels.ablate_(actual, direction, scale)
        assert_close(actual, reference.ablate(x, direction, scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "view_of",
    [lambda b: b[:, :5, 3:4100], lambda b: b[:, ::2, 8:-8], lambda b: b.transpose(0, 1)[..., :4097]],
    ids=["padded", "every-other-token", "transposed-leading"],
)
def test_ablate_strided_rows(backend, dtype, view_of):
    buffer = _random((3, 7, 4112), dtype)
    x = view_of(buffer)
    direction = _random(x.shape[-1], torch.bfloat16, seed=1)
    expected = buffer.clone()
    view_of(expected).copy_(reference.ablate(x, direction, 2.0))
    refusal_kernels.ablate_(x, direction, 2.0)
    assert_close(buffer, expected)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 7)])
def test_ablate_empty(backend, shape):
    x = torch.empty(shape, device="cuda")
    refusal_kernels.ablate_(x, torch.ones(shape[-1], device="cuda"))
    assert x.shape == shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_directions", (1, 64))
@pytest.mark.parametrize("d", (7, 4097, 16385))
@pytest.mark.parametrize("per_batch_row", (False, True))
def test_ablate_indexed(backend, dtype, num_directions, d, per_batch_row):
    x = _random((5, 6, d), dtype)
    directions = _random((num_directions, d), torch.float32, seed=1)
    index_shape = x.shape[:1] if per_batch_row else x.shape[:-1]
    generator = torch.Generator(device="cuda").manual_seed(2)
    index = torch.randint(-1, num_directions, index_shape, generator=generator, device="cuda")
    index.view(-1)[0] = -1
    expected = reference.ablate_indexed(x, directions, index, 0.5)
    refusal_kernels.ablate_indexed_(x, directions, index, 0.5)
    assert_close(x, expected)


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (100, 300), (4096, 1000), (3, 37, 300), (8, 512, 1111)])
def test_orthogonalize(backend, dtype, shape):
    weight = _random(shape, dtype)
    direction = _random(shape[-2], torch.float32, seed=1)
    for scale in SCALES:
        actual = weight.clone()
        refusal_kernels.orthogonalize_(actual, direction, scale)
        assert_close(actual, reference.orthogonalize(weight, direction, scale))


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonalize_strided_experts(backend, dtype):
    buffer = _random((4, 260, 520), dtype)
    weight = buffer[:, 2:258, 5:505]
    direction = _random(256, torch.float16, seed=1)
    expected = buffer.clone()
    expected[:, 2:258, 5:505] = reference.orthogonalize(weight, direction, 0.5)
    refusal_kernels.orthogonalize_(weight, direction, 0.5)
    assert_close(buffer, expected)


@pytest.mark.parametrize("axis", ("column", "row"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (100, 300), (4096, 1000), (3, 37, 300), (8, 512, 1111)])
def test_orthogonalize_norm_preserving(backend, axis, dtype, shape):
    weight = _random(shape, dtype)
    direction = _random(shape[-2], torch.float32, seed=1)
    for scale in SCALES:
        actual = weight.clone()
        refusal_kernels.orthogonalize_norm_preserving_(actual, direction, scale, axis)
        assert_close(actual, reference.orthogonalize_norm_preserving(weight, direction, scale, axis))


@pytest.mark.parametrize("axis", ("column", "row"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonalize_norm_preserving_strided_experts(backend, axis, dtype):
    buffer = _random((4, 260, 520), dtype)
    weight = buffer[:, 2:258, 5:505]
    direction = _random(256, torch.float16, seed=1)
    expected = buffer.clone()
    expected[:, 2:258, 5:505] = reference.orthogonalize_norm_preserving(weight, direction, 0.5, axis)
    refusal_kernels.orthogonalize_norm_preserving_(weight, direction, 0.5, axis)
    assert_close(buffer, expected)


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
