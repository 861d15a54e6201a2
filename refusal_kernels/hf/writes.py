"""What a decoder layer receives and what a module writes into the residual stream, edited in place.

A leaf module (it imports only the ops): every hook that edits the residual stream, in `hooks`
and in the pipeline's scoring, is an `on_input` or an `on_write`.
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


def on_input(layer: nn.Module, edit: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """A forward pre-hook that edits the residual stream `layer` receives, in place."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        edit_(layer_input(args, kwargs), edit)

    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def on_write(site: nn.Module, edit: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """A forward hook that edits what `site` writes into the residual stream, in place."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        edit_(written_tensor(output), edit)

    return site.register_forward_hook(hook)


def ablate_output(site: nn.Module, direction: torch.Tensor, scale: float) -> RemovableHandle:
    """A forward hook on `site` that ablates what it writes, in place (`direction` on the device
    it computes on)."""
    return on_write(site, lambda x: ops.ablate_(x, direction, scale))
