"""Every provider of a `torch.ops.refusal` op, registered as a dispatcher kernel.

  CPU    the C++ kernels (csrc/cpu/), registered by `_C`
  CUDA   the C++ kernels (csrc/cuda/) in a CUDA build; otherwise the Triton kernels, for the
         ops that have one
  any    the pure-torch reference (`torch_reference`), registered as the fallback
         (CompositeExplicitAutograd): it runs wherever no kernel is registered for the
         device, e.g. AWQ, NF4 and GGUF storage on CUDA, or MPS tensors

So every caller, inside the package or not, runs an op the same way: `torch.ops.refusal.<op>`.
`set_backend` (or the environment variable REFUSAL_KERNELS_BACKEND, read at import) overrides
the kernels for CUDA tensors by registering another provider over them:

  "cuda"    the CUDA C++ kernels (an error at the first call if this build has none)
  "triton"  the Triton kernels (the reference for the ops that have none)
  "torch"   the pure-PyTorch reference
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

from .. import _ops
from . import torch_reference

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "REFUSAL_KERNELS_BACKEND"

# The module under refusal_kernels.backends.triton that holds each op's kernel, as `<op>_`.
TRITON_MODULES = {
    "ablate": "",
    "ablate_indexed": "",
    "orthogonalize": "",
    "orthogonalize_norm_preserving": "",
    "orthogonalize_int8": ".quant",
    "orthogonalize_gptq": ".quant",
    "orthogonalize_fp8": ".quant",
}

# Read before any Python kernel is registered under the CUDA key.
_BUILD_HAS_CUDA_KERNELS = all(_ops.has_kernel(op, "CUDA") for op in _ops.FLOAT_OPS)
_HAS_TRITON = torch.version.cuda is not None and importlib.util.find_spec("triton") is not None


def has_cuda_kernels() -> bool:
    """Whether this build of the extension contains the CUDA C++ kernels."""
    return _BUILD_HAS_CUDA_KERNELS


def _triton_kernel(op: str) -> Callable[..., None]:
    # Triton is imported at the first call, not at registration, so that importing
    # refusal_kernels stays cheap and TRITON_INTERPRET can still be set afterwards.
    def run(*args) -> None:
        module = importlib.import_module(f"{__name__}.triton{TRITON_MODULES[op]}")
        getattr(module, f"{op}_")(*args)

    return run


def _missing_cuda_kernel(*args) -> None:
    raise RuntimeError("backend 'cuda' was chosen but this build has no CUDA kernels; rebuild with a CUDA toolkit")


def _kernels(backend: str) -> dict[str, Callable[..., None]]:
    """The CUDA kernel of every op under `backend`."""
    if backend == "torch":
        return dict(torch_reference.KERNELS)
    if backend == "triton":
        return {op: _triton_kernel(op) if op in TRITON_MODULES else torch_reference.KERNELS[op] for op in _ops.OPS}
    return {op: _missing_cuda_kernel for op in _ops.OPS}


def _register(backend: str, dispatch_key: str) -> torch.library.Library:
    library = torch.library.Library("refusal", "IMPL")
    for op, kernel in _kernels(backend).items():
        library.impl(op, kernel, dispatch_key)
    return library


# Held for the life of the process: a Library takes its kernels back when it is collected.
_FALLBACK = _register("torch", "CompositeExplicitAutograd")
_DEFAULT_CUDA = None if _BUILD_HAS_CUDA_KERNELS or not _HAS_TRITON else _register("triton", "CUDA")
_override: torch.library.Library | None = None
_choice: str | None = None


def _validated(name: str | None, source: str) -> str | None:
    if name in (None, "", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def _default_backend() -> str:
    return "cuda" if _BUILD_HAS_CUDA_KERNELS else "triton" if _HAS_TRITON else "torch"


def set_backend(name: str | None) -> None:
    """Choose the kernels for CUDA tensors; None or "auto" restores the default choice."""
    global _choice, _override
    choice = _validated(name, "backend")
    if _override is not None:
        _override._destroy()
        _override = None
    _choice = choice
    if choice is not None and choice != _default_backend():
        _override = _register(choice, "CUDA")


def get_backend() -> str:
    """The backend that CUDA tensors use now."""
    return _choice or _default_backend()


set_backend(_validated(os.environ.get(ENV_VAR), ENV_VAR))
