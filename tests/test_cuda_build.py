"""The CUDA build registers a CUDA kernel for every op (no GPU needed to check that).

Set REFUSAL_KERNELS_EXPECT_CUDA=1 where the extension must have been built with CUDA, so that
a build that silently fell back to CPU only fails instead of skipping.
"""

import os

import pytest
import torch

from refusal_kernels import _ops, backends


def test_every_op_has_a_cuda_kernel():
    if os.environ.get("REFUSAL_KERNELS_EXPECT_CUDA") != "1":
        if torch.version.cuda is None:
            pytest.skip("torch is not a CUDA build")
        if not backends.has_cuda_kernels():
            pytest.skip("extension built without CUDA kernels; set REFUSAL_KERNELS_EXPECT_CUDA=1 to require them")
    missing = [op for op in _ops.OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"refusal::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"
