"""Addressing the leading dims of a tensor with at most two strides, as the kernels do."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class TwoLevelLayout(NamedTuple):
    """Item i of the flattened leading dims starts at (i // inner) * outer_stride + (i % inner) * inner_stride."""

    inner: int
    outer_stride: int
    inner_stride: int


def two_level_layout(t: torch.Tensor, num_trailing: int) -> TwoLevelLayout | None:
    """The layout of t's dims before its last `num_trailing`, or None if it needs more than two strides.

    Dims of size 1 carry no addressing; adjacent dims that tile memory evenly merge into one, so
    [B, T, d] slices of a padded buffer and any contiguous tensor need at most two strides.
    """
    leading = t.dim() - num_trailing
    merged: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(t.shape[:leading], t.stride()[:leading], strict=True):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        return None
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (_, outer_stride), (inner, inner_stride) = merged
    return TwoLevelLayout(inner, outer_stride, inner_stride)


def launch_in_place(t: torch.Tensor, num_trailing: int, launch: Callable[[torch.Tensor, TwoLevelLayout], None]) -> None:
    """Call launch(t, layout) on t itself, or on a contiguous copy written back when t needs three strides."""
    layout = two_level_layout(t, num_trailing)
    if layout is not None:
        launch(t, layout)
        return
    # Three or more irregular leading strides are rare enough that a round trip is acceptable.
    work = t.contiguous()
    launch(work, two_level_layout(work, num_trailing))
    t.copy_(work)
