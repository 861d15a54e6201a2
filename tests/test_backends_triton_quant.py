"""Triton kernels for int8, GPTQ and fp8 storage, run by the Triton interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so this module sets it at import;
no other test module imports triton.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from quant_cases import FORMATS, GROUP, OUT, clone_state, fp8_half_step, tensors, weight_with_component

from refusal_kernels.quant import fp8

triton_quant = pytest.importorskip("refusal_kernels.backends.triton.quant")

TRITON_OPS = {
    "int8 torchao": lambda s, d: triton_quant.orthogonalize_int8_(*s, d),
    "int8 bitsandbytes": lambda s, d: triton_quant.orthogonalize_int8_(*s, d, 1.0, True),
    "gptq": lambda s, d: triton_quant.orthogonalize_gptq_(*s[:3], s[3], d, GROUP),
    "gptq act-order": lambda s, d: triton_quant.orthogonalize_gptq_(*s[:3], s[3], d, GROUP),
    "gptq v2": lambda s, d: triton_quant.orthogonalize_gptq_(*s[:3], s[3], d, GROUP, 1.0, "v2"),
    "gptq v2 act-order": lambda s, d: triton_quant.orthogonalize_gptq_(*s[:3], s[3], d, GROUP, 1.0, "v2"),
    "fp8 tensor": lambda s, d: triton_quant.orthogonalize_fp8_(*s, d),
    "fp8 row": lambda s, d: triton_quant.orthogonalize_fp8_(*s, d),
    "fp8 block": lambda s, d: triton_quant.orthogonalize_fp8_(*s, d),
}


@pytest.mark.parametrize("name", TRITON_OPS)
def test_triton_matches_cpu_kernel(name):
    fmt = FORMATS[name]
    d = torch.randn(OUT, generator=torch.Generator().manual_seed(3))
    state = fmt.quantize(weight_with_component(d))
    expected = clone_state(state)
    TRITON_OPS[name](state, d)
    fmt.kernel_(expected, d)
    actual_w, expected_w = fmt.dequantize(state), fmt.dequantize(expected)
    step = 2 * torch.maximum(fmt.half_step(state), fmt.half_step(expected))
    assert ((actual_w - expected_w).abs() <= step * 1.001 + 1e-6).all()
    assert ((actual_w - expected_w).abs() > 0.01 * step).float().mean() < 0.01


def test_triton_checks_metadata_before_writing():
    fmt = FORMATS["gptq"]
    state = fmt.quantize(torch.randn(OUT, 96))
    before = clone_state(state)
    with pytest.raises(ValueError, match="group_size"):
        triton_quant.orthogonalize_gptq_(*state[:3], None, torch.randn(OUT), 36)
    assert all(torch.equal(a, b) for a, b in zip(tensors(state), tensors(before), strict=True))
    with pytest.raises(ValueError, match="zeros_format"):
        triton_quant.orthogonalize_gptq_(*state[:3], None, torch.randn(OUT), GROUP, 1.0, "v3")
    assert all(torch.equal(a, b) for a, b in zip(tensors(state), tensors(before), strict=True))


def test_triton_fp8_blocks_match_cpu_kernel():
    """A 2 x 2 grid of 128 x 128 blocks, partial at both edges (FORMATS' 40 x 96 weight fits in one block)."""
    generator = torch.Generator().manual_seed(5)
    d = torch.randn(136, generator=generator)
    weight = torch.randn(136, 200, generator=generator) + 30 * d[:, None] * torch.randn(200, generator=generator)
    state = fp8.quantize(weight, (128, 128))
    assert tuple(state[1].shape) == (2, 2)
    expected = clone_state(state)
    triton_quant.orthogonalize_fp8_(*state, d)
    fp8.orthogonalize_(*expected, d)
    step = 2 * torch.maximum(fp8_half_step(state), fp8_half_step(expected))
    gap = (fp8.dequantize(*state) - fp8.dequantize(*expected)).abs()
    assert (gap <= step * 1.001 + 1e-6).all()
    assert (gap > 0.01 * step).float().mean() < 0.01
