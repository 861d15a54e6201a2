"""The pure-PyTorch reference of every op, as an in-place kernel: works on any device, fast on none.

Registered as every op's fallback kernel, and under CUDA by `set_backend("torch")`. Each
kernel checks metadata with the same `_checks` as the fake kernels, before it writes.
"""

from __future__ import annotations

import torch

from .. import _checks, reference
from ..quant import awq, fp8, gguf, gptq, int8, nf4
from ..quant.gguf import feedback


def ablate_(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> None:
    _checks.check_ablate(x, direction, scale)
    x.copy_(reference.ablate(x, direction, scale))


def ablate_indexed_(x: torch.Tensor, directions: torch.Tensor, index: torch.Tensor, scale: float = 1.0) -> None:
    _checks.check_ablate_indexed(x, directions, index, scale)
    x.copy_(reference.ablate_indexed(x, directions, index, scale))


def orthogonalize_(weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> None:
    _checks.check_orthogonalize(weight, direction, scale)
    weight.copy_(reference.orthogonalize(weight, direction, scale))


def orthogonalize_norm_preserving_(
    weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0, axis: str = "column"
) -> None:
    _checks.check_orthogonalize_norm_preserving(weight, direction, scale, axis)
    weight.copy_(reference.orthogonalize_norm_preserving(weight, direction, scale, axis))


def orthogonalize_nf4_(
    packed, absmax, code, direction, blocksize, nested_absmax, nested_offset, nested_code, nested_blocksize, scale
) -> None:
    q = nf4.NF4Weight(packed, absmax, code, blocksize, nested_absmax, nested_offset, nested_code, nested_blocksize)
    nf4.orthogonalize_reference_(q, direction, scale)


def _gguf_kernel(module, type_name: str):
    """refusal::orthogonalize_<type_name> through `module`'s reference, with its feedback passes."""

    def orthogonalize_gguf_(blocks, direction, scale=1.0, layout="matrix", passes=0) -> None:
        feedback.orthogonalize_reference_(module, blocks, type_name, direction, scale, layout, passes)

    return orthogonalize_gguf_


KERNELS = {
    "ablate": ablate_,
    "ablate_indexed": ablate_indexed_,
    "orthogonalize": orthogonalize_,
    "orthogonalize_norm_preserving": orthogonalize_norm_preserving_,
    "orthogonalize_int8": int8.orthogonalize_reference_,
    "orthogonalize_gptq": gptq.orthogonalize_reference_,
    "orthogonalize_awq": awq.orthogonalize_reference_,
    "orthogonalize_fp8": fp8.orthogonalize_reference_,
    "orthogonalize_nf4": orthogonalize_nf4_,
    **{
        f"orthogonalize_{type_name.lower()}": _gguf_kernel(gguf.module_of(type_name), type_name)
        for type_name in gguf.OP_FORMATS
    },
}
