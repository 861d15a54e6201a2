"""The public ops: in-place ablation and orthogonalization (plain or norm-preserving), plus an out-of-place ablate.

All of them normalize the direction in fp32 and accumulate in fp32, whatever the storage
dtype, and run on the backend that `refusal_kernels.backends` picks for the tensor's device.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _ops, backends, reference

# GPU tensors whose data passed the checks, with the version they had then: each direction
# costs one host synchronization the first time it is used, and none afterwards.
_checked_versions = WeakIdKeyDictionary()


def _check_data_once(t: torch.Tensor, name: str, find_problem, target: torch.Tensor) -> None:
    if target.device.type in ("cpu", "meta") or t.device != target.device or torch.compiler.is_compiling():
        # The CPU kernel checks the data itself; the kernels' metadata checks report a
        # device mismatch; a traced graph has no data to check.
        return
    if _checked_versions.get(t) == t._version:
        return
    problem = find_problem(t)
    if problem:
        raise ValueError(f"{name} {problem}")
    _checked_versions[t] = t._version


def _nonzero_finite_rows(directions: torch.Tensor) -> str | None:
    norms = directions.float().reshape(-1, directions.shape[-1]).norm(dim=-1)
    bad = ~(torch.isfinite(norms) & (norms > 0))
    if bool(bad.any()):
        return f"must be finite and non-zero; rows with bad norms: {bad.nonzero().flatten().tolist()}"
    return None


def ablate_(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Remove `scale` times the component along `direction` from every vector of x, in place.

    Args:
        x: [..., d] float32, float16 or bfloat16; any leading strides, last-dim stride 1.
        direction: [d], any float dtype, same device; normalized internally in fp32.
        scale: 1 removes the component, values in (0, 1) remove part of it, 2 reflects it.

    Returns:
        x, for chaining.
    """
    _check_data_once(direction, "direction", _nonzero_finite_rows, x)
    backends.for_device(x.device.type).ablate_(x, direction, scale)
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
    _check_data_once(directions, "directions", _nonzero_finite_rows, x)
    _check_data_once(index, "index", lambda i: _index_problem(i, directions.shape[0]), x)
    backends.for_device(x.device.type).ablate_indexed_(x, directions, index, scale)
    return x


def _index_problem(index: torch.Tensor, num_directions: int) -> str | None:
    if index.numel() == 0:
        return None
    low, high = int(index.min()), int(index.max())
    if low < -1 or high >= num_directions:
        return f"holds values in [{low}, {high}]; valid values are -1 (skip) to {num_directions - 1}"
    return None


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
    _check_data_once(direction, "direction", _nonzero_finite_rows, weight)
    backends.for_device(weight.device.type).orthogonalize_(weight, direction, scale)
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
    _check_data_once(direction, "direction", _nonzero_finite_rows, weight)
    backends.for_device(weight.device.type).orthogonalize_norm_preserving_(weight, direction, scale, axis)
    return weight


def ablate(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Out-of-place `ablate_`: a new contiguous tensor; differentiable with respect to x."""
    _check_data_once(direction, "direction", _nonzero_finite_rows, x)
    if x.device.type in _ops.KERNEL_DEVICES:
        return torch.ops.refusal.ablated(x, direction, scale)
    _ops.check_ablate(x, direction, scale)
    return reference.ablate(x, direction, scale)
