"""The pure-PyTorch reference, applied in place: works on any device, fast on none."""

from __future__ import annotations

import torch

from .. import _ops, reference


def ablate_(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> None:
    _ops.check_ablate(x, direction, scale)
    x.copy_(reference.ablate(x, direction, scale))


def ablate_indexed_(x: torch.Tensor, directions: torch.Tensor, index: torch.Tensor, scale: float = 1.0) -> None:
    _ops.check_ablate_indexed(x, directions, index, scale)
    x.copy_(reference.ablate_indexed(x, directions, index, scale))


def orthogonalize_(weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> None:
    _ops.check_orthogonalize(weight, direction, scale)
    weight.copy_(reference.orthogonalize(weight, direction, scale))


def orthogonalize_norm_preserving_(
    weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0, axis: str = "column"
) -> None:
    _ops.check_orthogonalize_norm_preserving(weight, direction, scale, axis)
    weight.copy_(reference.orthogonalize_norm_preserving(weight, direction, scale, axis))
