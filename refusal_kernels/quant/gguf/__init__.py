"""GGUF block formats: the layouts of llama.cpp's quantized tensors, and pure-torch references.

One module per family of formats, each with the layout of its blocks, `dequantize` (blocks
to fp32), `quantize` (fp32 to blocks, following llama.cpp's reference quantizer for that type)
and `orthogonalize_reference_` (dequantize, orthogonalize in fp32, requantize every block with
fresh scales, written back into the same bytes):

  legacy    Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 values per block)
  kquants   Q4_K, Q5_K, Q6_K (256 values per super-block)
  kquants_low  Q2_K, Q3_K (256 values per super-block)

`orthogonalize_` edits the blocks of any of these types through the op of its type,
`refusal::orthogonalize_<type>` (a fused C++ kernel on CPU; the reference is its fallback);
its `passes` are the feedback passes of `feedback`. `dequantize` and `quantize` pick the
type's module, which `module_of` names.
"""

from __future__ import annotations

import torch

from ..._checks import check_direction_once, check_passes
from . import kquants, kquants_low, legacy
from ._blocks import LAYOUTS, check_type_name

_MODULES = {type_name: module for module in (legacy, kquants, kquants_low) for type_name in module.FORMATS}
# type name -> (values, bytes) per block, for every block type this package edits.
FORMATS = {type_name: module.FORMATS[type_name] for type_name, module in _MODULES.items()}
# The types edited by a dispatcher op, refusal::orthogonalize_<type>: every one.
OP_FORMATS = FORMATS

__all__ = ["FORMATS", "LAYOUTS", "OP_FORMATS", "dequantize", "module_of", "orthogonalize_", "quantize"]


def module_of(type_name: str):
    """The module of `type_name`'s layout and reference (legacy, kquants or kquants_low)."""
    check_type_name(type_name, FORMATS)
    return _MODULES[type_name]


def dequantize(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """uint8 blocks [rows, bytes_per_row] of `type_name` -> fp32 [rows, row_length]."""
    return module_of(type_name).dequantize(blocks, type_name)


def quantize(values: torch.Tensor, type_name: str) -> torch.Tensor:
    """fp32 [rows, row_length] -> uint8 blocks of `type_name`, as llama.cpp's reference quantizer."""
    return module_of(type_name).quantize(values, type_name)


def orthogonalize_(
    blocks: torch.Tensor,
    type_name: str,
    direction: torch.Tensor,
    scale: float = 1.0,
    layout: str = "matrix",
    passes: int = 0,
) -> torch.Tensor:
    """Orthogonalize a GGUF tensor's blocks against `direction` in place, in their own type.

    blocks: uint8 [rows, bytes_per_row], a tensor's rows as GGUF stores them.
    layout "matrix": the rows are the d_model outputs of a linear weight W [out, in],
        W <- W - scale d (d^T W), direction of length rows;
    layout "rows": each row is a d_model vector (token embeddings), v <- v - scale (v.d) d,
        direction of length row_length.
    Every block is requantized with a fresh scale (and min), as `quantize` would from the
    updated floats. `passes` feedback passes follow (`feedback`: the stored component along
    d shrinks with each; they hold a copy of the original bytes). Runs `torch.ops.refusal.orthogonalize_<type_name lowercased>`: the fused
    kernel on CPU, the reference elsewhere. Bad arguments raise ValueError/TypeError naming the
    argument before anything is written. Returns blocks.
    """
    check_type_name(type_name, FORMATS)  # before torch.ops, which would find "q4_k"'s op too
    check_passes(passes)  # before torch.ops, which would take a bool or a float for an int
    check_direction_once(direction, blocks)
    getattr(torch.ops.refusal, f"orthogonalize_{type_name.lower()}")(blocks, direction, scale, layout, passes)
    return blocks
