"""The CUDA build registers a CUDA kernel for every op that has one (no GPU needed to check that).

Set REFUSAL_KERNELS_EXPECT_CUDA=1 where the extension must have been built with CUDA, so that
a build that silently fell back to CPU only fails instead of skipping.
"""

import os

import pytest
import torch

from refusal_kernels import _ops, backends

# AWQ, NF4 and GGUF storage on CUDA run the reference fallback: no CUDA kernel was written for them.
WITHOUT_CUDA_KERNEL = ("orthogonalize_awq", "orthogonalize_nf4", *_ops.GGUF_OPS)


def test_every_op_has_a_cuda_kernel():
    if os.environ.get("REFUSAL_KERNELS_EXPECT_CUDA") != "1":
        if torch.version.cuda is None:
            pytest.skip("torch is not a CUDA build")
        if not backends.has_cuda_kernels():
            pytest.skip("extension built without CUDA kernels; set REFUSAL_KERNELS_EXPECT_CUDA=1 to require them")
    missing = [op for op in _ops.OPS if op not in WITHOUT_CUDA_KERNEL and not _ops.has_kernel(op, "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"
    assert all(_ops.has_kernel(op, "CompositeExplicitAutograd") for op in WITHOUT_CUDA_KERNEL)
    if backends.get_backend() == "cuda":  # no Python provider registered over the CUDA entries
        extra = [op for op in WITHOUT_CUDA_KERNEL if _ops.has_kernel(op, "CUDA")]
        assert not extra, f"a CUDA kernel is registered for {extra}, which have none"
