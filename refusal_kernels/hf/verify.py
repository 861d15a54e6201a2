"""The self-check of every edit: one short forward pass that measures r in every residual write.

`patch` and `orthogonalize_model_` call `check` unless verify=False. It runs the model on the
structure probe's few tokens and measures, at every checked site,

    leak = max over tokens of |w . r̂| / ||h||

where w is what the site adds to the residual stream and h the residual state after it: the
embeddings' write (the first layer's input, h = w) and each layer's write (its output minus its
input, h its output). Every selected layer is checked, and the embeddings when they are edited;
the check is of the structure, so it always removes r at scale 1, whatever scale the edit then
uses. Measuring the layer's whole write, not the sites `describe_model` read, is what catches a
write it missed or misread.

In hooks mode the check runs with the hooks in place (at scale 1). In weights mode it runs
*before* the first tensor is written, with a hook on each writer's module that applies the
planned edit to its output (y <- y - (y.u) u, which is what the edited weight and bias write,
for any storage format); if r leaks, nothing has been changed. A check after the edit could not restore the
model exactly: undo_ is exact only to one rounding step, and requantization not at all.

The tolerance is a few rounding steps of the residual stream's dtype (TOLERANCE), far below
what a missed writer leaves (several percent of the state); the README gives the leaks measured
on the default model after a correct edit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import families, probe, writes

# The largest leak |w . r̂| / ||h|| the check lets pass, by the dtype of the residual stream: a
# few half-steps of the dtype (rounding the write and the sum can leave up to u |r̂_j| of a state
# whose norm sits in one channel), far below a missed writer's several percent.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class ResidualLeakError(families.StructureError):
    """The self-check found r in the residual stream after an edit; the message names the first site."""


@dataclass(frozen=True)
class Expectation:
    """Which writes must be orthogonal to which unit direction (fp32 [d]).

    embeddings: the direction the first layer's input must be orthogonal to, or None.
    layers: layer index -> the direction its write must be orthogonal to.
    """

    embeddings: torch.Tensor | None
    layers: Mapping[int, torch.Tensor]


def expectation(directions: Mapping[int, torch.Tensor], embeddings: bool) -> Expectation:
    """What removing r at scale 1 from these layers' writes (per-layer directions), and from the
    embeddings' write if `embeddings`, must achieve; the embeddings take the first layer's direction."""
    unit = {i: d.float() / d.float().norm() for i, d in directions.items()}
    return Expectation(unit[min(unit)] if unit and embeddings else None, unit)


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])


def measure(
    model: nn.Module,
    structure: families.ModelStructure,
    expected: Expectation,
    simulate: Mapping[nn.Module, tuple[torch.Tensor, float]] | None = None,
) -> list[tuple[str, float, torch.dtype]]:
    """(site, leak, dtype) for every checked site, in forward order; `simulate` maps a module to
    the (unit direction, scale) its output is ablated with during the pass."""
    leaks: list[tuple[str, float, torch.dtype]] = []
    inputs: dict[int, torch.Tensor] = {}

    def fraction(write: torch.Tensor, state: torch.Tensor, direction: torch.Tensor) -> float:
        write, state = write.float(), state.float()
        along = (write @ direction.to(write.device)).abs()
        return float((along / state.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)).max())

    def before(index: int):
        def hook(module: nn.Module, args: Any, kwargs: dict) -> None:
            state = writes.layer_input(args, kwargs)
            inputs[index] = state.detach().clone()
            if index == 0 and expected.embeddings is not None:
                leaks.append(
                    (
                        "the embeddings (the first layer's input)",
                        fraction(state, state, expected.embeddings),
                        state.dtype,
                    )
                )

        return hook

    def after(index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if index not in expected.layers or index not in inputs:
                return
            state = writes.written_tensor(output)
            name = structure.layers[index].name
            leaks.append((name, fraction(state - inputs.pop(index), state, expected.layers[index]), state.dtype))

        return hook

    # What each edited weight will write: its module's output with the planned edit applied.
    handles = [writes.ablate_output(module, *edit) for module, edit in (simulate or {}).items()]
    try:
        for layer in structure.layers:
            handles.append(layer.layer.register_forward_pre_hook(before(layer.index), with_kwargs=True))
            handles.append(layer.layer.register_forward_hook(after(layer.index)))
        token_embedding = structure.token_embedding
        ids = probe.probe_ids(token_embedding.num_embeddings, families.execution_device(token_embedding))
        probe.run(families.decoder_of(model), ids)  # the decoder alone: the LM head's logits are not needed
    finally:
        for handle in handles:
            handle.remove()
    return leaks


def check(
    model: nn.Module,
    structure: families.ModelStructure,
    expected: Expectation,
    simulate: Mapping[nn.Module, tuple[torch.Tensor, float]] | None = None,
) -> None:
    """Raise ResidualLeakError naming the first site whose leak is above the tolerance."""
    if expected.embeddings is None and not expected.layers:
        return
    leaks = measure(model, structure, expected, simulate)
    measured = {site for site, _, _ in leaks}
    unseen = [layer.name for layer in structure.layers if layer.index in expected.layers and layer.name not in measured]
    if unseen:
        raise ResidualLeakError(
            f"the self-check's forward pass never ran {unseen[0]} on the residual stream, so it cannot tell whether r "
            "is gone there; the model is unchanged. Name the layers with structure=StructureSpec(...)."
        )
    for site, leak, dtype in leaks:
        if leak > tolerance(dtype):
            raise ResidualLeakError(_message(structure, site, leak, dtype))


def _message(structure: families.ModelStructure, site: str, leak: float, dtype: torch.dtype) -> str:
    layer = next((layer for layer in structure.layers if layer.name == site), None)
    read = ""
    if layer is not None:
        sites = ", ".join(s.name for s in layer.sites)
        writers = ", ".join(w.name for w in layer.writers)
        read = f" The structure read there: sites {sites}; writers {writers}."
    return (
        f"the self-check found r in the residual stream: {site} writes {leak:.2%} of the state's norm along r "
        f"(tolerance {tolerance(dtype):.2%} in {str(dtype).removeprefix('torch.')}); the model is unchanged.{read} "
        "Name the layers and writers with structure=StructureSpec(...), or pass verify=False to skip the check."
    )
