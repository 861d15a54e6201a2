"""Runs the Triton kernels on CPU under the Triton interpreter, in a child process.

TRITON_INTERPRET is read when a kernel is defined, so it cannot be switched on for some tests
of a process and off for others (such as the compiled GPU tests); the cases live in
triton_interpreter_cases.py and run in their own pytest process.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from refusal_kernels import _ops, backends

TESTS = pathlib.Path(__file__).parent
CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_under_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "triton_interpreter_cases.py")],
        cwd=TESTS.parent,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


@pytest.mark.skipif(
    backends.has_cuda_kernels() or torch.version.cuda is None or not HAS_TRITON,
    reason="Triton fills the CUDA kernels only in a CUDA build of torch with triton and no CUDA C++ kernels",
)
def test_triton_fills_the_cuda_kernels():
    # torch.ops.refusal.* then run on CUDA tensors, while "cuda" stays unavailable as a backend.
    assert all(_ops.has_kernel(op, "CUDA") for op in _ops.OPS)
    backends.set_backend("cuda")
    try:
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            # The CUDA entry, called on CPU tensors: no GPU is needed to reach it.
            torch.ops.refusal.ablate.default.redispatch(CUDA_KEY, torch.ones(2, 4), torch.ones(4), 1.0)
    finally:
        backends.set_backend(None)
