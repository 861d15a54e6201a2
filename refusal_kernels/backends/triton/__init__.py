"""The Triton kernels: the default for CUDA tensors when the extension has no CUDA kernels.

Each function checks metadata with the same `_checks.check_*` as the fake kernels, never reads
data on the host, and launches on the current stream, so it can be captured in a CUDA graph.
Under TRITON_INTERPRET=1 (set before triton is imported) they also run on CPU tensors.
"""

from __future__ import annotations

import torch

from ... import _checks
from .ablate import launch_ablate
from .orthogonalize import launch_orthogonalize, launch_orthogonalize_preserving_row_norms


# Dynamo would trace the launch code (stride arithmetic, overlap checks) and break the graph
# anyway; running these eagerly keeps compiled callers correct.
@torch.compiler.disable
def ablate_(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> None:
    """x [..., d] float32/float16/bfloat16 -= scale * (x.d) d per vector, d = direction [d] normalized in fp32."""
    _checks.check_ablate(x, direction, scale)
    launch_ablate(x, direction, None, False, scale)


@torch.compiler.disable
def ablate_indexed_(x: torch.Tensor, directions: torch.Tensor, index: torch.Tensor, scale: float = 1.0) -> None:
    """ablate_ with directions[index] [K, d] per vector (index x.shape[:-1]) or per batch row (x.shape[:1])."""
    _checks.check_ablate_indexed(x, directions, index, scale)
    launch_ablate(x, directions, index, _checks.index_is_per_batch_row(x, index), scale)


@torch.compiler.disable
def orthogonalize_(weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> None:
    """weight [..., d_model, d_in] -= scale * d (d^T weight) per matrix, direction [d_model], fp32 accumulation."""
    _checks.check_orthogonalize(weight, direction, scale)
    launch_orthogonalize(weight, direction, scale)


@torch.compiler.disable
def orthogonalize_norm_preserving_(
    weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0, axis: str = "column"
) -> None:
    """orthogonalize_ that keeps each column's norm (axis "column") or, row-normalized, each row's (axis "row")."""
    _checks.check_orthogonalize_norm_preserving(weight, direction, scale, axis)
    if axis == "column":
        launch_orthogonalize(weight, direction, scale, preserve_column_norms=True)
    else:
        launch_orthogonalize_preserving_row_norms(weight, direction, scale)
