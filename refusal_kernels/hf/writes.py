"""What a decoder layer receives and what a module writes into the residual stream, edited in place.

A leaf module (it imports only the ops), shared by the hooks, the self-check and the pipeline's
scoring and capture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import ops


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The residual stream a decoder layer receives, from its forward pre-hook arguments."""
    return args[0] if args else kwargs["hidden_states"]


def written_tensor(output: Any) -> torch.Tensor:
    """What a writer module adds to the residual stream: its output, or its output's first item."""
    return output if isinstance(output, torch.Tensor) else output[0]


def edit_(tensor: torch.Tensor, edit: Callable[[torch.Tensor], None]) -> None:
    """Apply an in-place op to `tensor`; a tensor strided in its last dim (a transposed write),
    which the fused ops refuse, is edited as a contiguous copy and copied back."""
    if tensor.stride(-1) == 1:
        edit(tensor)
        return
    packed = tensor.contiguous()
    edit(packed)
    tensor.copy_(packed)


def ablate_output(site: nn.Module, direction: torch.Tensor, scale: float) -> RemovableHandle:
    """A forward hook on `site` that ablates what it writes, in place (`direction` on the device
    it computes on)."""

    def ablate(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        edit_(written_tensor(output), lambda x: ops.ablate_(x, direction, scale))

    return site.register_forward_hook(ablate)
