"""Run-time interventions on a transformers model: directional ablation and activation addition.

`patch(mode="hooks")` ablates r at the three sites of Arditi et al. (2024), in every selected
layer and at every position, with the fused in-place `ablate_`:

  * the layer input (a forward pre-hook on the decoder layer);
  * the attention contribution as it is added to the residual (a forward hook on the attention
    module's output[0], or on the post-attention norm's output in Gemma 2/3);
  * the MLP contribution likewise (the MLP output, or the post-feedforward norm's output).

Each residual state is the layer-0 input (the embeddings, ablated there) plus the ablated
writes, so every state, the final norm's input included, is orthogonal to r: the final norm
needs no hook of its own.

The hooks modify tensors in place and allocate nothing. The sublayer outputs are fresh tensors
that the layer only adds to its residual, so ablating them in place is exactly the intended
semantics. The layer-0 input is the embedding output, or the caller's `inputs_embeds` tensor
itself, which is then ablated in place too. Works with `generate()` and the KV cache (keys and
values are computed from ablated states), padded batches (every position is ablated; the
padding does not matter) and `torch.compile` (the op is a registered mutating custom op).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import ops
from . import families, weights

MODES = ("hooks", "weights")


class PatchHandle:
    """Undoes an intervention: call `.remove()` or use the handle as a context manager.

    Removing twice is harmless.
    """

    def __init__(self, hook_handles: list[RemovableHandle], restore: Callable[[], None] | None = None) -> None:
        self._hook_handles = hook_handles
        self._restore = restore

    def remove(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        if self._restore is not None:
            restore, self._restore = self._restore, None
            restore()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The residual stream a decoder layer receives, from its forward pre-hook arguments."""
    return args[0] if args else kwargs["hidden_states"]


def written_tensor(output: Any) -> torch.Tensor:
    """What a writer module adds to the residual stream: its output, or its output's first item."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _ablating_hooks(layer: families.LayerStructure, direction: torch.Tensor, scale: float) -> list[RemovableHandle]:
    def ablate_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ops.ablate_(layer_input(args, kwargs), direction, scale)

    def ablate_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        ops.ablate_(written_tensor(output), direction, scale)

    return [
        layer.layer.register_forward_pre_hook(ablate_input, with_kwargs=True),
        layer.attention_site.register_forward_hook(ablate_output),
        layer.mlp_site.register_forward_hook(ablate_output),
    ]


def _weights_patch(
    model: nn.Module, structure: families.ModelStructure, direction: torch.Tensor, layers, scale: float
) -> PatchHandle:
    selected = set(families.layer_directions(direction, structure, layers))
    tied = weights.head_is_tied(model, structure)
    originals = [(t, t.detach().clone()) for w in structure.writers(selected) for t in w.storage]
    weights.orthogonalize_model_(model, direction, scale=scale, layers=layers)

    def restore() -> None:
        with torch.no_grad():
            for tensor, original in originals:
                tensor.copy_(original)
        if tied:
            weights.retie_head(model, structure)

    return PatchHandle([], restore)


def patch(
    model: nn.Module,
    direction: torch.Tensor,
    *,
    mode: str = "hooks",
    layers: Sequence[int] | None = None,
    scale: float = 1.0,
) -> PatchHandle:
    """Remove the refusal direction from `model` until the returned handle is removed.

    Args:
        model: a transformers causal LM of a supported family (see `families`).
        direction: [d_model], or one per layer [num_layers, d_model]; any float dtype,
            normalized internally.
        mode: "hooks" ablates at run time (see the module docstring); "weights" calls
            `orthogonalize_model_` and keeps a copy of every tensor it changes (the residual
            writers: embeddings, attention and MLP output projections, their biases) so that
            remove() can restore them; only this mode holds that extra memory.
        layers: only these layer indices (default all). In weights mode, only their writers
            are orthogonalized (and the embeddings), which is not the same as hooking them.
        scale: 1 removes the component; see `refusal_kernels.ablate_`.

    Returns:
        A PatchHandle: `with patch(...):` or `handle.remove()`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    structure = families.describe_model(model)
    if mode == "weights":
        families.check_scale(scale)
        return _weights_patch(model, structure, direction, layers, scale)
    directions = families.layer_directions(direction, structure, layers)
    scale = families.check_scale(scale)
    handles: list[RemovableHandle] = []
    for index, layer_direction in directions.items():
        handles += _ablating_hooks(structure.layers[index], layer_direction, scale)
    return PatchHandle(handles)


def add_direction(model: nn.Module, direction: torch.Tensor, *, layer: int, alpha: float = 1.0) -> PatchHandle:
    """Activation addition: x <- x + alpha * direction at one layer's input, every position.

    `direction` [d_model] is used as given, not normalized: its length sets the strength
    (a difference of means induces refusal at alpha=1). The addition is in place on the
    layer input, in its dtype.

    Returns:
        A PatchHandle, as `patch`.
    """
    structure = families.describe_model(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(structure.layers):
        raise ValueError(f"layer must be an int in [0, {len(structure.layers)}), got {layer!r}")
    if not isinstance(direction, torch.Tensor) or direction.dim() != 1:
        raise ValueError(
            f"direction must be a 1-D tensor [{structure.hidden_size}], got {getattr(direction, 'shape', direction)}"
        )
    vector = families.layer_directions(direction, structure, [layer])[layer]
    target = structure.layers[layer].layer
    vector = vector.to(next(target.parameters()).dtype)
    alpha = float(alpha)

    def add(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        layer_input(args, kwargs).add_(vector, alpha=alpha)

    return PatchHandle([target.register_forward_pre_hook(add, with_kwargs=True)])
