"""Quantized orthogonalize on a CUDA device: the CUDA kernels (when built) and the Triton
kernels, both against the CPU kernel on the same storage, and every quantized op inside
torch.compile(fullgraph=True). Run this module on its own for
the Triton part: test_backends_triton_quant.py turns the interpreter on for its whole process."""

from __future__ import annotations

import os

import pytest
import torch
from quant_cases import FORMATS, OUT, clone_state, weight_with_component

import refusal_kernels as rk
from refusal_kernels import _ops
from refusal_kernels.quant import nf4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_FORMATS = [
    "int8 torchao",
    "int8 bitsandbytes",
    "gptq",
    "gptq act-order",
    "gptq v2",
    "gptq v2 act-order",
    "fp8 tensor",
    "fp8 row",
    "fp8 block",
]


def to_device(state, device):
    moved = [t.to(device) if isinstance(t, torch.Tensor) else t for t in state]
    return state._make(moved) if isinstance(state, nf4.NF4Weight) else tuple(moved)


def _assert_matches_cpu_kernel(fmt, state, expected) -> None:
    """The GPU-edited state against the CPU kernel's result, within one quantization step per element."""
    actual_w, expected_w = fmt.dequantize(to_device(state, "cpu")), fmt.dequantize(expected)
    step = 2 * torch.maximum(fmt.half_step(to_device(state, "cpu")), fmt.half_step(expected))
    assert ((actual_w - expected_w).abs() <= step * 1.001 + 1e-6).all()
    assert ((actual_w - expected_w).abs() > 0.01 * step).float().mean() < 0.01


def _case(name):
    fmt = FORMATS[name]
    d = torch.randn(OUT, generator=torch.Generator().manual_seed(4))
    expected = fmt.quantize(weight_with_component(d))
    state = to_device(clone_state(expected), "cuda")
    fmt.kernel_(expected, d)
    return fmt, d, state, expected


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", GPU_FORMATS)
def test_gpu_matches_cpu_kernel(name, backend):
    op = {"int8": "orthogonalize_int8", "gptq": "orthogonalize_gptq", "fp8": "orthogonalize_fp8"}[name.split()[0]]
    if backend == "cuda" and not _ops.has_kernel(op, "CUDA"):
        pytest.skip("this build has no CUDA kernels")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip(
            "the Triton interpreter is on in this process (test_backends_triton_quant.py); run this module alone"
        )
    fmt, d, state, expected = _case(name)
    previous = rk.get_backend()
    rk.set_backend(backend)
    try:
        fmt.kernel_(state, d.cuda())
    finally:
        rk.set_backend(previous)
    _assert_matches_cpu_kernel(fmt, state, expected)


# Every quantized op, on its default CUDA kernel (AWQ and NF4: the reference fallback).
@pytest.mark.parametrize("name", ["int8 torchao", "gptq act-order", "awq", "fp8 block", "nf4 double-quant"])
def test_every_quantized_op_inside_torch_compile_fullgraph(name):
    fmt, d, state, expected = _case(name)
    torch._dynamo.reset()
    torch.compile(fmt.kernel_, fullgraph=True)(state, d.cuda())
    _assert_matches_cpu_kernel(fmt, state, expected)
