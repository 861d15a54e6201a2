"""CPU speed of the fused GGUF orthogonalize against the pure-torch reference, per block type.

A [4096, 14336] weight (d_model x d_in of a down projection), layout "matrix", its blocks made
once per type by the reference quantizer: "refusal" is the fused C++ kernel
(refusal_kernels.quant.gguf.orthogonalize_), "eager" the reference (dequantize, orthogonalize
in fp32, requantize every block), in the same run. Each call edits the blocks in place, so
every round starts from the previous round's result, the same for both.

The whole file: the default model's GGUF written by hf.orthogonalize_gguf, against one read of it.

Run: pytest benchmarks/bench_gguf.py   (the summary prints the ratio table)
"""

from __future__ import annotations

import pytest
import torch
from conftest import peak_extra_memory_mib

from refusal_kernels.quant import gguf

SHAPE = (4096, 14336)
ROUNDS = {"refusal": 3, "eager": 1}


@pytest.fixture(scope="module")
def problem():
    """(the blocks of each type, made on first use and shared by both impls; the direction)."""
    generator = torch.Generator().manual_seed(0)
    values, direction = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE[0], generator=generator)
    blocks = {}

    def blocks_of(type_name: str) -> torch.Tensor:
        if type_name not in blocks:
            blocks[type_name] = gguf.quantize(values, type_name)
        return blocks[type_name]

    return blocks_of, direction


@pytest.mark.parametrize("impl", ["refusal", "eager"])
@pytest.mark.parametrize("type_name", list(gguf.FORMATS))
def test_orthogonalize_gguf(benchmark, problem, type_name, impl):
    blocks_of, direction = problem
    blocks = blocks_of(type_name)
    op = {"refusal": gguf.orthogonalize_, "eager": gguf.module_of(type_name).orthogonalize_reference_}[impl]

    def fn():
        op(blocks, type_name, direction)

    benchmark.group = f"orthogonalize_gguf {list(SHAPE)} {type_name}"
    benchmark.extra_info["impl"] = impl
    # The blocks, read and written once each: the ideal traffic of the in-place op.
    benchmark.extra_info["bytes"] = 2 * blocks.numel()
    if impl == "refusal":
        fn()  # first call: thread pool and allocator warm-up are not the op's memory
    benchmark.extra_info["peak_extra_MiB"] = peak_extra_memory_mib(fn)
    benchmark.pedantic(fn, rounds=ROUNDS[impl], warmup_rounds=0)


@pytest.fixture(scope="module")
def default_gguf():
    from refusal_kernels.models import ModelUnavailableError, default_gguf_path

    try:
        return default_gguf_path()
    except ModelUnavailableError as error:
        pytest.skip(f"the default model is not installed: {error}")


def _read_once(path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# The whole GGUF write of the default model (every residual writer edited in its own type, the
# rest copied) against reading the file once, as `cat > /dev/null` does: "copy" in the ratio
# table. "refusal" is the default (two feedback passes), "plain" no passes.
@pytest.mark.parametrize("impl", ["refusal", "plain", "copy"])
def test_orthogonalize_gguf_file(benchmark, default_gguf, tmp_path, impl):
    from refusal_kernels.hf import orthogonalize_gguf

    direction = torch.randn(896, generator=torch.Generator().manual_seed(0))
    passes = {"refusal": 2, "plain": 0}.get(impl)

    def fn():
        if passes is None:
            _read_once(default_gguf)
        else:
            orthogonalize_gguf(default_gguf, tmp_path / "out.gguf", direction, feedback_passes=passes)

    _read_once(default_gguf)  # from the page cache, for every impl
    benchmark.group = "orthogonalize_gguf default model (491 MB, Q4_K_M)"
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["bytes"] = default_gguf.stat().st_size
    benchmark.pedantic(fn, rounds=1 if passes is not None else 5, warmup_rounds=0)
