"""Which kernel each op dispatches to, and how set_backend and REFUSAL_KERNELS_BACKEND change it (no GPU needed).

A CUDA entry of the dispatch table is reached from CPU tensors with `redispatch`: the kernel
registered there runs as it would for CUDA tensors, so the choice is tested without a GPU.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import refusal_kernels as rk
from refusal_kernels import _ops, backends, reference
from refusal_kernels.quant import gguf

CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _cuda_kernel_ablates_cpu_tensors() -> bool:
    """Run refusal::ablate's CUDA entry on CPU tensors; True if it ablated them as the reference does."""
    x, direction = torch.randn(3, 8), torch.randn(8)
    expected = reference.ablate(x, direction, 0.5)
    torch.ops.refusal.ablate.default.redispatch(CUDA_KEY, x, direction, 0.5)
    return torch.allclose(x, expected, atol=1e-6)


@pytest.fixture
def restore_backend():
    yield
    rk.set_backend(None)


@pytest.mark.parametrize("op", _ops.OPS)
def test_every_op_has_a_cpu_kernel_a_fake_kernel_and_the_reference_fallback(op):
    assert _ops.has_kernel(op, "CPU")
    assert _ops.has_kernel(op, "Meta")
    assert _ops.has_kernel(op, "CompositeExplicitAutograd")


def test_the_reference_fallback_runs_where_no_kernel_is_registered():
    # CompositeExplicitAutograd is what every device without its own kernel (MPS, XPU, ...) runs.
    x, direction = torch.randn(4, 8), torch.randn(8)
    expected = reference.ablate(x, direction)
    fallback = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    torch.ops.refusal.ablate.default.redispatch(fallback, x, direction, 1.0)
    torch.testing.assert_close(x, expected)


@pytest.mark.usefixtures("restore_backend")
def test_set_backend_torch_puts_the_reference_under_cuda_and_none_restores_the_default():
    default = rk.get_backend()
    rk.set_backend("torch")
    assert rk.get_backend() == "torch"
    assert all(_ops.has_kernel(op, "CUDA") for op in _ops.OPS)
    assert _cuda_kernel_ablates_cpu_tensors()
    rk.set_backend(None)
    assert rk.get_backend() == default
    if backends.has_cuda_kernels():
        # The C++ CUDA kernel is back, and it refuses CPU tensors.
        with pytest.raises(RuntimeError):
            _cuda_kernel_ablates_cpu_tensors()


@pytest.mark.usefixtures("restore_backend")
def test_auto_is_the_default_choice():
    rk.set_backend(None)
    default = rk.get_backend()
    assert default == "cuda" if backends.has_cuda_kernels() else default in ("triton", "torch")
    rk.set_backend("torch")
    rk.set_backend("auto")
    assert rk.get_backend() == default


@pytest.mark.usefixtures("restore_backend")
@pytest.mark.skipif(backends.has_cuda_kernels(), reason="this build has CUDA kernels, so 'cuda' is available")
def test_choosing_cuda_without_cuda_kernels_fails_at_the_first_call():
    rk.set_backend("cuda")
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        _cuda_kernel_ablates_cpu_tensors()


def _backends_here() -> list[str]:
    has_triton = torch.version.cuda is not None and importlib.util.find_spec("triton") is not None
    return ["torch"] + (["triton"] if has_triton else []) + (["cuda"] if backends.has_cuda_kernels() else [])


@pytest.mark.usefixtures("restore_backend")
@pytest.mark.parametrize("backend", _backends_here())
def test_gguf_ops_run_the_reference_for_cuda_tensors_under_every_backend(backend):
    # No CUDA or Triton kernel: the CUDA entry of each GGUF op is the reference (set_backend's
    # provider, or else the CompositeExplicitAutograd fallback), which runs on CPU tensors too.
    rk.set_backend(backend)
    generator = torch.Generator().manual_seed(0)
    for op, type_name in zip(_ops.GGUF_OPS, gguf.OP_FORMATS, strict=True):
        blocks = gguf.quantize(torch.randn(6, 2 * gguf.FORMATS[type_name][0], generator=generator), type_name)
        direction = torch.randn(6, generator=generator)
        expected = blocks.clone()
        gguf.module_of(type_name).orthogonalize_reference_(expected, type_name, direction, 0.5)
        getattr(torch.ops.refusal, op).default.redispatch(CUDA_KEY, blocks, direction, 0.5, "matrix")
        assert torch.equal(blocks, expected), op


def test_an_unknown_backend_is_a_value_error_and_changes_nothing():
    before = rk.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.set_backend("cudnn")
    assert rk.get_backend() == before


def _import_with_env(value: str) -> subprocess.CompletedProcess:
    code = (
        "import torch, refusal_kernels as rk\n"
        "from refusal_kernels import _ops\n"
        "print(rk.get_backend(), all(_ops.has_kernel(op, 'CUDA') for op in _ops.OPS))\n"
    )
    env = {**os.environ, backends.ENV_VAR: value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_the_environment_variable_chooses_at_import():
    result = _import_with_env("torch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch", "True"]


def test_a_bad_environment_variable_names_itself_at_import():
    result = _import_with_env("fastest")
    assert result.returncode != 0
    assert "REFUSAL_KERNELS_BACKEND must be one of" in result.stderr


@pytest.mark.usefixtures("restore_backend")
@pytest.mark.skipif(
    torch.version.cuda is None or importlib.util.find_spec("triton") is None,
    reason="needs triton and a CUDA build of torch",
)
def test_set_backend_triton_covers_every_op_and_falls_back_where_triton_has_no_kernel():
    from quant_cases import FORMATS, GROUP, OUT, clone_state, tensors, weight_with_component

    rk.set_backend("triton")
    assert all(_ops.has_kernel(op, "CUDA") for op in _ops.OPS)
    # AWQ has no Triton kernel: its CUDA entry is the reference, which runs on CPU tensors too.
    fmt = FORMATS["awq"]
    direction = torch.randn(OUT, generator=torch.Generator().manual_seed(3))
    state = fmt.quantize(weight_with_component(direction))
    expected = clone_state(state)
    fmt.reference_(expected, direction)
    qweight, qzeros, scales = state
    torch.ops.refusal.orthogonalize_awq.default.redispatch(CUDA_KEY, qweight, qzeros, scales, direction, GROUP, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(tensors(state), tensors(expected), strict=True))
