"""The `torch.ops.refusal` library as Python sees it.

Importing this module loads `_C`, which defines every schema (csrc/ops.cpp) and registers
the C++ kernels: CPU, and CUDA in a CUDA build. Here we add what belongs in Python: the fake
kernels for tracing and the autograd formula of `ablated`. The other providers (Triton, the
pure-torch fallback) are registered by `refusal_kernels.backends`.
"""

from __future__ import annotations

import torch

from . import _C, _checks  # noqa: F401  (_C registers the schemas and the C++ kernels)
from .quant.gguf import OP_FORMATS as GGUF_FORMATS

FLOAT_OPS = ("ablate", "ablate_indexed", "orthogonalize", "orthogonalize_norm_preserving")
QUANT_FORMATS = ("int8", "gptq", "awq", "fp8", "nf4")
# One op per GGUF block type, on a tensor's blocks: a CPU kernel, no CUDA or Triton one (CUDA
# tensors run the reference fallback).
GGUF_OPS = tuple(f"orthogonalize_{type_name.lower()}" for type_name in GGUF_FORMATS)
# Every in-place op: each has a CPU kernel, a fake kernel and a reference fallback.
OPS = FLOAT_OPS + tuple(f"orthogonalize_{fmt}" for fmt in QUANT_FORMATS) + GGUF_OPS


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `refusal::<op>` has a kernel registered for a dispatch key such as "CUDA"."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"refusal::{op}", dispatch_key)


# Fake kernels: metadata checks only, so that opcheck and torch.compile trace without data.
@torch.library.register_fake("refusal::ablate")
def _(x, direction, scale=1.0):
    _checks.check_ablate(x, direction, scale)


@torch.library.register_fake("refusal::ablate_indexed")
def _(x, directions, index, scale=1.0):
    _checks.check_ablate_indexed(x, directions, index, scale)


@torch.library.register_fake("refusal::orthogonalize")
def _(weight, direction, scale=1.0):
    _checks.check_orthogonalize(weight, direction, scale)


@torch.library.register_fake("refusal::orthogonalize_norm_preserving")
def _(weight, direction, scale=1.0, axis="column"):
    _checks.check_orthogonalize_norm_preserving(weight, direction, scale, axis)


@torch.library.register_fake("refusal::orthogonalize_int8")
def _(qweight, row_scale, direction, scale=1.0, absmax_scale=False):
    _checks.check_int8(qweight, row_scale, direction, scale)


@torch.library.register_fake("refusal::orthogonalize_gptq")
def _(qweight, qzeros, scales, g_idx, direction, group_size, scale=1.0, zeros_format="v1"):
    _checks.check_gptq(qweight, qzeros, scales, g_idx, direction, group_size, scale, zeros_format)


@torch.library.register_fake("refusal::orthogonalize_awq")
def _(qweight, qzeros, scales, direction, group_size, scale=1.0):
    _checks.check_awq(qweight, qzeros, scales, direction, group_size, scale)


@torch.library.register_fake("refusal::orthogonalize_fp8")
def _(weight, weight_scale, direction, scale=1.0):
    _checks.check_fp8(weight, weight_scale, direction, scale)


@torch.library.register_fake("refusal::orthogonalize_nf4")
def _(
    packed,
    absmax,
    code,
    direction,
    blocksize,
    nested_absmax,
    nested_offset,
    nested_code,
    nested_blocksize=256,
    scale=1.0,
):
    _checks.check_nf4(
        packed, absmax, code, direction, blocksize, nested_absmax, nested_offset, nested_code, nested_blocksize, scale
    )


def _register_gguf_fake(type_name: str) -> None:
    values_per_block, bytes_per_block = GGUF_FORMATS[type_name]

    def fake(blocks, direction, scale=1.0, layout="matrix", passes=0):
        _checks.check_gguf(blocks, direction, scale, layout, passes, type_name, values_per_block, bytes_per_block)

    torch.library.register_fake(f"refusal::orthogonalize_{type_name.lower()}", fake)


for _type_name in GGUF_FORMATS:
    _register_gguf_fake(_type_name)


@torch.library.register_fake("refusal::ablated")
def _(x, direction, scale=1.0):
    _checks.check_ablate(x, direction, scale)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _ablated_setup_context(ctx, inputs, output):
    _, ctx.direction, ctx.scale = inputs


def _ablated_backward(ctx, grad):
    # P = I - s d d^T is symmetric, so the vector-Jacobian product is P applied to grad.
    # The direction gets no gradient: it is a fixed probe, not a parameter.
    return torch.ops.refusal.ablated(grad, ctx.direction, ctx.scale), None, None


torch.library.register_autograd("refusal::ablated", _ablated_backward, setup_context=_ablated_setup_context)
