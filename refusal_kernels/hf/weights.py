"""Weight orthogonalization of a loaded transformers model: the refusal direction, baked in.

Every parameter that writes into the residual stream (see `families`) is changed in place so
that what it writes has no component along r:

  * nn.Linear weights [d_model, d_in] and fused experts [E, d_model, d_ff]: W <- W - s r (r^T W);
  * embedding rows, biases, GPT-2 Conv1D weights [d_in, d_model] and transposed experts: each
    row v <- v - s (v.r) r.

Quantized projections (see `families`) are edited in their own storage by the format's op in
`refusal_kernels.quant`, which requantizes each group with a fresh scale: the written
component along r is then zero only up to one quantization step, not exactly.

With scale=1, dense weights and no post-sublayer norms this equals `patch(mode="hooks")`:
every residual state is orthogonal to r. Tied embeddings are untied first (the head keeps the
original matrix), so the logits are those of the hooks model too.

Gemma 2/3 add norm(y) = g * y / rms(y) to the residual, not y. That is orthogonal to r iff y
is orthogonal to g * r, so their attention and MLP writers are orthogonalized against
normalize(g * r), with g the norm's effective gain (1 + weight in Gemma). The residual is then
orthogonal to r, as in hooks mode, but the states differ: the hooks ablate r after the norm,
which keeps the RMS of y, while the weights remove g * r before it, which changes rms(y) and
so rescales the token's whole written vector. On tiny random Gemma 2/3 models (seeded, fp32,
r carrying a large share of each write) the relative logit difference between the two modes
is 0.09 (Gemma 2) and 0.08 (Gemma 3); tests/test_hf_patch.py asserts < 0.25. On trained
models, where r carries a small fraction of each write, it is smaller.

`scale` is one number for every writer or a `Schedule` (see `schedule`): a scale per layer for
the attention writers and for the MLP writers, and one for the embeddings. Writers whose scale
is 0 are left as they are and not recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from . import families
from .schedule import Schedule, check_scale_or_schedule


@dataclass(frozen=True)
class ChangedTensor:
    """One tensor `orthogonalize_model_` changed: name, shape, layout (MATRIX/ROWS), layer, and
    the scale it was orthogonalized with (its Schedule entry, or the one number).

    For a quantized weight, shape is that of the dequantized [out, in] matrix and `format`
    names the storage ("gptq", "bitsandbytes-nf4", ...; see `refusal_kernels.quant`); None
    for a dense tensor.
    """

    name: str
    shape: tuple[int, ...]
    layout: str
    layer: int | None
    scale: float
    format: str | None = None


@dataclass
class OrthogonalizationRecord:
    """What `orthogonalize_model_` did.

    changed: every tensor it modified, in order.
    untied_head: the name of the output head's weight if it was untied from the token
        embedding (it now holds its own copy of the original matrix), else None.
    scale: the scale used, a number or a Schedule.
    """

    changed: list[ChangedTensor] = field(default_factory=list)
    untied_head: str | None = None
    scale: float | Schedule = 1.0


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


def head_is_tied(model: nn.Module, structure: families.ModelStructure) -> bool:
    head = _output_head(model)
    return head is not None and head.weight is structure.token_embedding.weight


def _refresh_tied_keys(model: nn.Module) -> None:
    # transformers caches the tied-parameter mapping; save_pretrained drops the keys it lists.
    if hasattr(model, "all_tied_weights_keys") and hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def untie_head(model: nn.Module, structure: families.ModelStructure) -> str:
    """Give the output head its own copy of the token embedding; returns the head's parameter name."""
    head = _output_head(model)
    head.weight = nn.Parameter(structure.token_embedding.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    _refresh_tied_keys(model)
    return next(name for name, p in model.named_parameters() if p is head.weight)


def retie_head(model: nn.Module, structure: families.ModelStructure) -> None:
    """Undo `untie_head`: the head shares the token embedding's parameter again."""
    _output_head(model).weight = structure.token_embedding.weight
    model.config.tie_word_embeddings = True
    _refresh_tied_keys(model)


@dataclass(frozen=True)
class _Edit:
    """One writer to orthogonalize, with its fp32 unit direction (on its device) and its scale."""

    writer: families.ResidualWriter
    direction: torch.Tensor
    scale: float


def _plan(
    model: nn.Module,
    direction: torch.Tensor,
    scale: float | Schedule,
    include_embeddings: bool,
    layers: Sequence[int] | None,
) -> tuple[families.ModelStructure, float | Schedule, list[_Edit]]:
    """The structure, the checked scale and every edit; bad arguments raise before anything is written."""
    structure = families.describe_model(model)
    directions = families.layer_directions(direction, structure, layers)
    scale = check_scale_or_schedule(scale, len(structure.layers))
    schedule = scale if isinstance(scale, Schedule) else Schedule.constant(len(structure.layers), scale)
    first = directions[min(directions)] if directions else None
    gains: dict[int, torch.Tensor] = {}
    edits = []
    for writer in structure.writers(set(directions), include_embeddings and first is not None):
        writer_scale = schedule.scale_of(writer)
        if writer_scale == 0:
            continue
        base = first if writer.layer is None else directions[writer.layer]
        gain = None
        if writer.post_norm is not None:
            gain = gains.setdefault(id(writer.post_norm), families.norm_gain(writer.post_norm))
        target = families.writer_direction(base, gain).to(writer.parameter.device)
        edits.append(_Edit(writer, target, writer_scale))
    _check_quantized(edits)
    return structure, scale, edits


def _check_quantized(edits: list[_Edit]) -> None:
    """Every quantized writer's layout, checked before anything is written; errors name the tensor."""
    for edit in edits:
        quantized = edit.writer.quantized
        if quantized is None:
            continue
        try:
            quantized.check(edit.direction, edit.scale)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{edit.writer.name} ({quantized.format}): {error}") from error


def _apply(
    model: nn.Module,
    structure: families.ModelStructure,
    edits: list[_Edit],
    scale: float | Schedule,
) -> OrthogonalizationRecord:
    """Make the planned edits."""
    record = OrthogonalizationRecord(scale=scale)
    if any(e.writer.component == families.EMBEDDING for e in edits) and head_is_tied(model, structure):
        record.untied_head = untie_head(model, structure)
    with torch.no_grad():
        for edit in edits:
            writer, quantized = edit.writer, edit.writer.quantized
            if quantized is not None:
                quantized.orthogonalize_(edit.direction, edit.scale)
                shape, fmt = quantized.shape, quantized.format
            else:
                orthogonalize = ops.orthogonalize_ if writer.layout == families.MATRIX else ops.ablate_
                orthogonalize(writer.parameter.data, edit.direction, edit.scale)
                shape, fmt = tuple(writer.parameter.shape), None
            record.changed.append(ChangedTensor(writer.name, shape, writer.layout, writer.layer, edit.scale, fmt))
    return record


def orthogonalize_model_(
    model: nn.Module,
    direction: torch.Tensor,
    *,
    scale: float | Schedule = 1.0,
    include_embeddings: bool = True,
    layers: Sequence[int] | None = None,
) -> OrthogonalizationRecord:
    """Orthogonalize every residual-stream writer of `model` against `direction`, in place.

    Args:
        model: a transformers causal LM of a supported family (see `families`).
        direction: [d_model], or one per layer [num_layers, d_model]; any float dtype. With one
            per layer, layer i's writers use row i and the embeddings use the row of the
            first selected layer.
        scale: 1 removes the component; see `refusal_kernels.ablate_`. A Schedule gives each
            layer's attention and MLP writers, and the embeddings, their own scale (0 leaves
            them untouched).
        include_embeddings: also orthogonalize the token (and learned position) embedding rows;
            a head tied to the token embedding is untied first and keeps the original matrix.
        layers: only the writers of these layers (embeddings still follow include_embeddings).

    Quantized projections are edited in their quantized storage (see the module docstring).

    Returns:
        An OrthogonalizationRecord naming every tensor changed.

    Bad arguments raise ValueError/TypeError before any tensor is changed.
    """
    structure, scale, edits = _plan(model, direction, scale, include_embeddings, layers)
    return _apply(model, structure, edits, scale)
