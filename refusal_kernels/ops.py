"""The public ops: in-place ablation and orthogonalization (plain or norm-preserving), plus an out-of-place ablate.

All of them normalize the direction in fp32 and accumulate in fp32, whatever the storage
dtype, and run through the dispatcher: the kernel registered for the tensor's device
(see `refusal_kernels.backends`).
"""

from __future__ import annotations

import torch

from . import _checks


def ablate_(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Remove `scale` times the component along `direction` from every vector of x, in place.

    Args:
        x: [..., d] float32, float16 or bfloat16; any leading strides, last-dim stride 1.
        direction: [d], any float dtype, same device; normalized internally in fp32.
        scale: 1 removes the component, values in (0, 1) remove part of it, 2 reflects it.

    Returns:
        x, for chaining.
    """
    _checks.check_direction_once(direction, x)
    torch.ops.refusal.ablate(x, direction, scale)
    return x


def ablate_indexed_(x: torch.Tensor, directions: torch.Tensor, index: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Ablate a different direction from each vector (or each batch row) of x, in place.

    Args:
        x: [..., d] float32, float16 or bfloat16, as in `ablate_`.
        directions: [K, d] candidate directions, any float dtype.
        index: int64 of shape x.shape[:-1] (one per vector) or x.shape[:1] (one per batch
            row, shared by its tokens); -1 leaves the vector untouched.
        scale: as in `ablate_`.

    Returns:
        x, for chaining.
    """
    _checks.check_direction_once(directions, x, "directions")
    _checks.check_data_once(index, "index", lambda i: _checks.index_problem(i, directions.shape[0]), x)
    torch.ops.refusal.ablate_indexed(x, directions, index, scale)
    return x


def orthogonalize_(weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """W <- W - scale * d (d^T W) for a weight that writes into the residual stream, in place.

    Args:
        weight: [d_model, d_in] (nn.Linear layout) or a stack [E, d_model, d_in] of experts;
            float32, float16 or bfloat16, last-dim stride 1.
        direction: [d_model], any float dtype, same device.
        scale: as in `ablate_`.

    d^T W is accumulated in fp32; the extra memory is O(d_in), never a d_model x d_in copy.

    Returns:
        weight, for chaining.
    """
    _checks.check_direction_once(direction, weight)
    torch.ops.refusal.orthogonalize(weight, direction, scale)
    return weight


def orthogonalize_norm_preserving_(
    weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0, axis: str = "column"
) -> torch.Tensor:
    """orthogonalize_ that keeps the norms of the weight's columns or rows, in place.

    Args:
        weight, direction, scale: as in `orthogonalize_`.
        axis: "column": each column w_j (the d_model-long vector that d is removed from)
            becomes ||w_j|| normalize(w_j - scale (d.w_j) d). "row": the row-normalized form
            (norm-preserving biprojected abliteration): divide each row by its norm, remove
            d from that matrix as orthogonalize_ does, then scale each row back to its norm.

    A column or row that ends up at zero norm stays zero. The column form reads W once for
    c = d^T W and the column norms together (the updated norms follow from them); the row
    form reads each row once more, to find its updated norm. Extra memory is O(d_in + d_model).

    Returns:
        weight, for chaining.
    """
    _checks.check_direction_once(direction, weight)
    torch.ops.refusal.orthogonalize_norm_preserving(weight, direction, scale, axis)
    return weight


def ablate(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Out-of-place `ablate_`: a new contiguous tensor; differentiable with respect to x."""
    _checks.check_direction_once(direction, x)
    return torch.ops.refusal.ablated(x, direction, scale)
