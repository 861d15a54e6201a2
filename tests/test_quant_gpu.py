"""Quantized orthogonalize on a CUDA device: the CUDA kernels (when built) and the Triton
kernels, both against the CPU kernel on the same storage. Run this module on its own for
the Triton part: test_quant_triton.py turns the interpreter on for its whole process."""

from __future__ import annotations

import os

import pytest
import torch
from quant_cases import FORMATS, OUT, clone_state, weight_with_component

import refusal_kernels as rk
from refusal_kernels import _ops

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
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in state)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", GPU_FORMATS)
def test_gpu_matches_cpu_kernel(name, backend):
    op = {"int8": "orthogonalize_int8", "gptq": "orthogonalize_gptq", "fp8": "orthogonalize_fp8"}[name.split()[0]]
    if backend == "cuda" and not _ops.has_kernel(op, "CUDA"):
        pytest.skip("this build has no CUDA kernels")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter is on in this process (test_quant_triton.py); run this module alone")
    fmt = FORMATS[name]
    d = torch.randn(OUT, generator=torch.Generator().manual_seed(4))
    expected = fmt.quantize(weight_with_component(d))
    state = to_device(clone_state(expected), "cuda")
    previous = rk.get_backend()
    rk.set_backend(backend)
    try:
        fmt.kernel_(state, d.cuda())
    finally:
        rk.set_backend(previous)
    fmt.kernel_(expected, d)
    actual_w, expected_w = fmt.dequantize(to_device(state, "cpu")), fmt.dequantize(expected)
    step = 2 * torch.maximum(fmt.half_step(to_device(state, "cpu")), fmt.half_step(expected))
    assert ((actual_w - expected_w).abs() <= step * 1.001 + 1e-6).all()
    assert ((actual_w - expected_w).abs() > 0.01 * step).float().mean() < 0.01
