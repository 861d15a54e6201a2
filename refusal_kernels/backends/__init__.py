"""Which kernel runs an op.

CPU tensors always run the C++ CPU kernel. CUDA tensors run the CUDA C++ kernels when the
extension was built with them, and the Triton kernels otherwise. `set_backend` or the
environment variable REFUSAL_KERNELS_BACKEND overrides the choice for GPU tensors:

  "cuda"    the CUDA C++ kernels (an error if this build has none)
  "triton"  the Triton kernels
  "torch"   the pure-PyTorch reference, in place (any device)
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from .. import _ops

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "REFUSAL_KERNELS_BACKEND"

_choice: str | None = None


def _validated(name: str | None, source: str) -> str | None:
    if name in (None, "", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Choose the backend for GPU tensors; None or "auto" restores the default choice."""
    global _choice
    _choice = _validated(name, "backend")


def get_backend() -> str:
    """The backend that GPU tensors use now."""
    chosen = _choice or _validated(os.environ.get(ENV_VAR), ENV_VAR)
    if chosen is not None:
        return chosen
    return "cuda" if has_cuda_kernels() else "triton"


# Read once, before `_register_triton_as_cuda_kernels` may fill the CUDA slots with Triton.
_BUILD_HAS_CUDA_KERNELS = all(_ops.has_kernel(op, "CUDA") for op in _ops.OPS)


def has_cuda_kernels() -> bool:
    """Whether this build of the extension contains the CUDA C++ kernels."""
    return _BUILD_HAS_CUDA_KERNELS


def for_device(device_type: str) -> ModuleType:
    """The module whose ablate_/ablate_indexed_/orthogonalize_/orthogonalize_norm_preserving_ run on this device type."""
    if device_type == "cpu":
        from . import native

        return native
    backend = get_backend() if device_type == "cuda" else "torch"
    if backend == "cuda":
        if not has_cuda_kernels():
            raise RuntimeError(
                "backend 'cuda' was chosen but this build has no CUDA kernels; rebuild with a CUDA toolkit"
            )
        from . import native

        return native
    if backend == "triton":
        from . import triton

        return triton
    from . import torch_reference

    return torch_reference


def _register_triton_as_cuda_kernels() -> None:
    """Make torch.ops.refusal.* run the Triton kernels on CUDA tensors, for builds without CUDA kernels.

    The Triton package is imported on the first call, not here, so importing refusal_kernels
    stays cheap and TRITON_INTERPRET can still be set afterwards.
    """

    def triton_kernel(op: str):
        def run(*args, **kwargs) -> None:
            from . import triton

            getattr(triton, f"{op}_")(*args, **kwargs)

        return run

    for op in _ops.OPS:
        torch.library.register_kernel(f"refusal::{op}", "cuda", triton_kernel(op))


if not _BUILD_HAS_CUDA_KERNELS and torch.version.cuda is not None and importlib.util.find_spec("triton"):
    _register_triton_as_cuda_kernels()
