"""Run-time interventions on a transformers model: directional ablation and activation addition.

`patch(mode="hooks")` ablates r at the three sites of Arditi et al. (2024), in every selected
layer and at every position, with the fused in-place `ablate_`:

  * the layer input (a forward pre-hook on the decoder layer);
  * each write into the residual, as it is added (a forward hook on each site `families`
    reads: a token mixer's or MLP's output[0], or the post-sublayer norm's output after it);
  * where the sites cannot be read (`hook_structure`), the layer's own output instead.

Each residual state is the layer-0 input (the embeddings, ablated there) plus the ablated
writes, so every state, the final norm's input included, is orthogonal to r: the final norm
needs no hook of its own.

The hooks modify tensors in place and allocate nothing. The sublayer outputs are fresh tensors
that the layer only adds to its residual, so ablating them in place is exactly the intended
semantics. The layer-0 input is the embedding output, or the caller's `inputs_embeds` tensor
itself, which is then ablated in place too. Works with `generate()` and the KV cache (keys and
values are computed from ablated states), padded batches (every position is ablated; the
padding does not matter) and `torch.compile` (the op is a registered mutating custom op).

With a `Schedule` as scale, the hooks ablate only the writes, each at its own scale: the
embeddings at the layer-0 input (what they write), and each layer's attention and MLP
sites; the layer inputs are left as they are. Each write is then the one the
scheduled weight edit produces, so for models without post-sublayer norms
`patch(mode="hooks")` equals `patch(mode="weights")` with the same schedule, up to rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import ops
from . import families, weights
from . import verify as verify_module
from .schedule import Schedule, check_scale_or_schedule
from .writes import ablate_output, on_input

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


def _ablate_input(layer: nn.Module, direction: torch.Tensor, scale: float) -> RemovableHandle:
    return on_input(layer, lambda x: ops.ablate_(x, direction, scale))


def _ablating_hooks(
    structure: families.ModelStructure, directions: dict[int, torch.Tensor], scale: float
) -> list[RemovableHandle]:
    """The three sites of every selected layer: its input, its attention write, its MLP write."""
    handles = []
    for index, direction in directions.items():
        layer = structure.layers[index]
        handles.append(_ablate_input(layer.layer, direction, scale))
        handles += [ablate_output(site.module, direction, scale) for site in layer.sites]
    return handles


def _scheduled_hooks(
    structure: families.ModelStructure, directions: dict[int, torch.Tensor], schedule: Schedule
) -> list[RemovableHandle]:
    """Only the writes, each at its scale: the embeddings (at the layer-0 input), attention and MLP."""
    handles = []
    if schedule.embeddings and directions:
        # As in weights mode, the embeddings take the first selected layer's direction.
        first_layer = structure.layers[0].layer
        direction = directions[min(directions)].to(families.execution_device(first_layer))
        handles.append(_ablate_input(first_layer, direction, schedule.embeddings))
    for index, direction in directions.items():
        layer = structure.layers[index]
        for site in layer.sites:
            scale = (schedule.attention if site.component == families.ATTENTION else schedule.mlp)[index]
            if scale:
                handles.append(ablate_output(site.module, direction, scale))
    return handles


def hook_structure(model: nn.Module, spec: families.StructureSpec | None = None) -> families.ModelStructure:
    """`describe_model`, or, where it cannot read a layer's sites, the decoder layers alone
    (`families.layers_only`): hooks on each layer's input and output still remove r from every
    residual state. The fallback warns, naming what could not be read."""
    try:
        return families.describe_model(model, spec)
    except families.StructureError as error:
        if spec is not None:
            raise
        structure = families.layers_only(model, str(error))
        warnings.warn(f"{error}; the hooks ablate each decoder layer's input and output instead", stacklevel=3)
        return structure


def model_shape(model: nn.Module) -> tuple[int, int]:
    """(decoder layers, d_model) as the structure reader sees them (a multimodal config keeps
    them in its text config)."""
    structure = hook_structure(model)
    return len(structure.layers), structure.hidden_size


def _weights_patch(
    model: nn.Module,
    direction: torch.Tensor,
    layers,
    scale: float | Schedule,
    verify: bool,
    spec: families.StructureSpec | None,
) -> PatchHandle:
    record = weights.orthogonalize_model_(
        model, direction, scale=scale, layers=layers, verify=verify, structure=spec, undo=weights.EXACT
    )
    return PatchHandle([], lambda: weights.undo_(record))


def patch(
    model: nn.Module,
    direction: torch.Tensor,
    *,
    mode: str = "hooks",
    layers: Sequence[int] | None = None,
    scale: float | Schedule = 1.0,
    verify: bool = True,
    structure: families.StructureSpec | None = None,
) -> PatchHandle:
    """Remove the refusal direction from `model` until the returned handle is removed.

    Args:
        model: a transformers causal LM of a supported family (see `families`).
        direction: [d_model], or one per layer [num_layers, d_model]; any float dtype,
            normalized internally.
        mode: "hooks" ablates at run time (see the module docstring); "weights" calls
            `orthogonalize_model_(undo="exact")`, whose record keeps O(d_in) per dense writer
            plus the original of each element its restore would miss, and a copy of quantized
            storage, so that remove() restores every writer bit for bit with `undo_`; only
            this mode holds that extra memory.
        layers: only these layer indices (default all). In weights mode, only their writers
            are orthogonalized (and the embeddings), which is not the same as hooking them.
        scale: 1 removes the component; see `refusal_kernels.ablate_`. A Schedule gives each
            layer's attention and MLP writes, and the embeddings, their own scale; in hooks
            mode it ablates those writes only (see the module docstring).
        verify: run the self-check (`refusal_kernels.hf.verify`), one short forward pass that
            raises ResidualLeakError naming the first layer that still writes r, after removing
            the hooks (hooks mode) or before writing anything (weights mode). False skips it.
        structure: a StructureSpec naming the layers and writers, for a model `describe_model`
            cannot read. Without one, hooks mode on such a model ablates each decoder layer's
            input and output instead (with a warning), which keeps every residual state
            orthogonal to r; weights mode raises StructureError.

    Returns:
        A PatchHandle: `with patch(...):` or `handle.remove()`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    spec = structure
    if mode == "weights":
        return _weights_patch(model, direction, layers, scale, verify, spec)
    described = hook_structure(model, spec)
    directions = families.layer_directions(direction, described, layers)
    scale = check_scale_or_schedule(scale, len(described.layers))
    if isinstance(scale, Schedule) and described.unread is not None:
        raise families.StructureError(f"{described.unread}; a Schedule needs each layer's attention and MLP sites")

    def install() -> list[RemovableHandle]:
        if isinstance(scale, Schedule):
            return _scheduled_hooks(described, directions, scale)
        return _ablating_hooks(described, directions, scale)

    if not verify:
        return PatchHandle(install())
    # The check is of the structure: with the hooks at scale 1 (the requested ones when they are),
    # every checked write must be orthogonal to r.
    exact = not isinstance(scale, Schedule) and scale == 1
    handles = install() if exact else _ablating_hooks(described, directions, 1.0)
    # The embeddings' write is ablated at the first layer's input, when that layer is hooked.
    expected = verify_module.expectation(directions, embeddings=0 in directions)
    try:
        verify_module.check(model, described, expected)
    except BaseException:
        PatchHandle(handles).remove()
        raise
    if exact:
        return PatchHandle(handles)
    PatchHandle(handles).remove()
    return PatchHandle(install())


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
    return PatchHandle([on_input(target, lambda x: x.add_(vector, alpha=alpha))])
