"""CPU speed of the fused quantized orthogonalize against the pure-torch reference.

GPTQ int4, group size 128, on a [4096, 14336] weight (d_model x d_in of a down projection):
"refusal" is the fused C++ kernel, "eager" the reference in refusal_kernels.quant.gptq
(dequantize, orthogonalize in fp32, requantize with the same rules), in the same run.

Run: pytest benchmarks/bench_quant.py   (the summary prints the ratio table)
"""

from __future__ import annotations

import pytest
import torch
from conftest import peak_extra_memory_mib

from refusal_kernels.quant import gptq

SHAPE = (4096, 14336)
GROUP_SIZE = 128
ROUNDS = {"refusal": 10, "eager": 2}


@pytest.fixture(scope="module")
def gptq_weight():
    torch.manual_seed(0)
    qweight, qzeros, scales = gptq.quantize(torch.randn(SHAPE), GROUP_SIZE)
    return qweight, qzeros, scales, torch.randn(SHAPE[0])


@pytest.mark.parametrize("impl", ["refusal", "eager"])
def test_orthogonalize_gptq(benchmark, gptq_weight, impl):
    qweight, qzeros, scales, direction = gptq_weight
    op = {"refusal": gptq.orthogonalize_, "eager": gptq.orthogonalize_reference_}[impl]

    def fn():
        op(qweight, qzeros, scales, None, direction, GROUP_SIZE)

    benchmark.group = f"orthogonalize_gptq {list(SHAPE)} int4 g{GROUP_SIZE}"
    benchmark.extra_info["impl"] = impl
    # The packed storage, read and written once each: the ideal traffic of the in-place op.
    benchmark.extra_info["bytes"] = 2 * sum(t.numel() * t.element_size() for t in (qweight, qzeros, scales))
    fn()  # first call: thread pool and allocator warm-up are not the op's memory
    benchmark.extra_info["peak_extra_MiB"] = peak_extra_memory_mib(fn)
    benchmark.pedantic(fn, rounds=ROUNDS[impl], warmup_rounds=0)
