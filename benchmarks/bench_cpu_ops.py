"""CPU speed of the C++ kernels against eager PyTorch and a same-size copy.

Run: pytest benchmarks/bench_cpu_ops.py   (the summary prints the ratio table)
"""

from __future__ import annotations

import pytest
import torch
from conftest import peak_extra_memory_mib

import refusal_kernels as rk
from refusal_kernels import reference

ABLATE_SHAPE = (8192, 4096)
ORTHOGONALIZE_SHAPE = (4096, 14336)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROUNDS = {"refusal": 20, "copy": 20, "eager": 5}


def run(benchmark, group, impl, fn, tensor):
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    # Read and written once each: the ideal traffic of every in-place op here.
    benchmark.extra_info["bytes"] = 2 * tensor.numel() * tensor.element_size()
    fn()  # first call: thread pool and allocator warm-up are not the op's memory
    benchmark.extra_info["peak_extra_MiB"] = peak_extra_memory_mib(fn)
    benchmark.pedantic(fn, rounds=ROUNDS[impl], warmup_rounds=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["refusal", "eager", "copy"])
def test_ablate(benchmark, dtype, impl):
    torch.manual_seed(0)
    x = torch.randn(ABLATE_SHAPE, dtype=DTYPES[dtype])
    direction = torch.randn(ABLATE_SHAPE[-1], dtype=DTYPES[dtype])
    fn = {
        "refusal": lambda: rk.ablate_(x, direction),
        "eager": lambda: reference.ablate_eager_(x, direction),
        "copy": lambda: x.mul_(1.0),
    }[impl]
    run(benchmark, f"ablate {list(ABLATE_SHAPE)} {dtype}", impl, fn, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["refusal", "eager", "copy"])
def test_orthogonalize(benchmark, dtype, impl):
    torch.manual_seed(0)
    weight = torch.randn(ORTHOGONALIZE_SHAPE, dtype=DTYPES[dtype])
    direction = torch.randn(ORTHOGONALIZE_SHAPE[0], dtype=DTYPES[dtype])
    fn = {
        "refusal": lambda: rk.orthogonalize_(weight, direction),
        "eager": lambda: reference.orthogonalize_eager_(weight, direction),
        "copy": lambda: weight.mul_(1.0),
    }[impl]
    run(benchmark, f"orthogonalize {list(ORTHOGONALIZE_SHAPE)} {dtype}", impl, fn, weight)


@pytest.mark.parametrize("axis", ["column", "row"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["refusal", "eager", "copy"])
def test_orthogonalize_norm_preserving(benchmark, axis, dtype, impl):
    torch.manual_seed(0)
    weight = torch.randn(ORTHOGONALIZE_SHAPE, dtype=DTYPES[dtype])
    direction = torch.randn(ORTHOGONALIZE_SHAPE[0], dtype=DTYPES[dtype])
    fn = {
        "refusal": lambda: rk.orthogonalize_norm_preserving_(weight, direction, axis=axis),
        "eager": lambda: weight.copy_(reference.orthogonalize_norm_preserving(weight, direction, axis=axis)),
        "copy": lambda: weight.mul_(1.0),
    }[impl]
    run(benchmark, f"orthogonalize_norm_preserving {axis} {list(ORTHOGONALIZE_SHAPE)} {dtype}", impl, fn, weight)
