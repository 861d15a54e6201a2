"""The weight orthogonalization as a rank-1 PEFT LoRA adapter: a few vectors per layer, not a model.

`orthogonalize_model_` changes each dense residual writer by a rank-1 update, so the same edit
fits a LoRA of rank 1 that `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the
unedited model. With t the writer's own unit direction (normalize(g * r) behind a post-sublayer
norm, as `weights._plan` finds it) and s its scale (a Schedule's entry for its layer and
component), the adapter holds:

  * nn.Linear W [d_model, d_in]: W <- W - s t (t^T W), so lora_B = -s t [d_model, 1] and
    lora_A = t^T W [1, d_in];
  * GPT-2's Conv1D W [d_in, d_model] (each row a residual vector): W <- W - s (W t) t^T, which
    is the same update of the transposed matrix: lora_A = (W t)^T, lora_B = -s t, saved with
    fan_in_fan_out=True as PEFT wants for Conv1D;
  * nn.Embedding E [vocab, d_model]: E <- E - s (E t) t^T, PEFT's embedding LoRA
    (delta = (B A)^T): lora_embedding_A = (E t)^T [1, vocab], lora_embedding_B = -s t [d_model, 1].

r = lora_alpha = 1, so PEFT's scaling is 1 and B A is exactly the update. A is computed in fp32
from the unedited weights (`weights._projection`, chunk by chunk) and A and B are stored in
fp32; the model is not changed.

A LoRA leaves biases alone, so a writer's bias b <- b - s (b.t) t is folded in with PEFT's
bias="lora_only": the adapter stores the edited bias (made by the same op as in
`orthogonalize_model_`, in the bias's dtype) as the targeted module's `base_layer.bias`, which
PEFT loads into the base model's bias, so it holds with the adapter active and after
`merge_and_unload()`. `disable_adapter()` does not bring the original bias back (PEFT warns
about that for every bias="lora_only" adapter).

What a PEFT LoRA cannot express raises ValueError naming the writer, before anything is
written: fused 3-D expert parameters, quantized writers (the update of the dequantized
weight would not be the requantized edit `orthogonalize_model_` makes), a sublayer's own bias
with no projection to attach it to, a model that mixes nn.Linear and Conv1D writers (one
fan_in_fan_out for the whole adapter), a Mamba mixer's out_proj in the model types whose
out_proj PEFT refuses to wrap (their fused kernels read the weight directly), an embedding
whose forward is more than a lookup of its rows (a learned position embedding's offset, a norm
on its output; a scalar `embed_scale` is PEFT's own convention and is applied to the LoRA too):
PEFT adds the LoRA's lookup of the module's input to the module's output, which then is not
the edit; and an edit of a token embedding that the output head is tied to: PEFT's merge adds
the embedding update to the one matrix both share, so `merge_and_unload()` would edit the head
too, which `orthogonalize_model_` keeps as it was.

There is no norm_preserving option: that edit rescales every column by its own factor, so its
update is not low rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import ops
from . import families, saving, weights
from .hooks import model_shape
from .schedule import Schedule

ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft.utils.CONFIG_NAME
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
RANK = 1
# PEFT's prefix for the base model's own modules in an adapter's state dict.
_KEY_PREFIX = "base_model.model."

# What each writer becomes in the adapter.
_LINEAR, _CONV1D, _EMBEDDING, _BIAS = "linear", "conv1d", "embedding", "bias"
_MODULE_KINDS = ((_EMBEDDING, nn.Embedding), (_CONV1D, Conv1D), (_LINEAR, nn.Linear))
_WEIGHT_KEYS = {
    _LINEAR: ("lora_A.weight", "lora_B.weight"),
    _CONV1D: ("lora_A.weight", "lora_B.weight"),
    _EMBEDDING: ("lora_embedding_A", "lora_embedding_B"),
}
_ALTERNATIVE = "use orthogonalize_model_ and save_abliterated to save the edited model instead"
# PEFT's LoRA refuses modules of these names in these model types: their Mamba kernels read the
# weights directly (peft.tuners.tuners_utils._check_lora_target_modules_mamba).
_PEFT_MAMBA_MODEL_TYPES = frozenset({"falcon_h1", "falcon_mamba", "mamba", "mamba2", "nemotron_h"})
_PEFT_MAMBA_MODULES = frozenset({"out_proj", "conv1d"})


@dataclass(frozen=True)
class LoRAExport:
    """What `export_lora` wrote.

    path: the adapter directory (resolved).
    target_modules: the module names the adapter targets, in the model's order.
    rank: the LoRA rank (1).
    n_parameters: the number of values saved (LoRA factors and folded biases).
    bytes_on_disk: the total size of the files in the directory.
    """

    path: Path
    target_modules: tuple[str, ...]
    rank: int
    n_parameters: int
    bytes_on_disk: int


@dataclass(frozen=True)
class _Part:
    """One edit as the adapter stores it: the PEFT module it targets and how."""

    edit: weights._Edit
    module_name: str
    kind: str


def _import_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("export_lora needs PEFT to describe the adapter: pip install peft") from error
    return peft


def _kind(writer: families.ResidualWriter) -> str:
    """How a dense writer goes into the adapter; ValueError naming it if PEFT cannot express it."""
    module, leaf = writer.module, writer.name.rsplit(".", 1)[-1]
    if writer.parameter.dim() == 3:
        raise ValueError(
            f"{writer.name} is a fused 3-D expert parameter, which a PEFT LoRA cannot express; {_ALTERNATIVE}"
        )
    if leaf == "bias" and isinstance(module, (nn.Linear, Conv1D)) and writer.parameter is module.bias:
        return _BIAS
    if leaf == "weight" and writer.parameter is getattr(module, "weight", None):
        for kind, module_class in _MODULE_KINDS:
            if isinstance(module, module_class):
                return kind
    raise ValueError(
        f"{writer.name} ({type(module).__name__}) is not the weight or bias of an nn.Linear, Conv1D or "
        f"nn.Embedding, which a PEFT LoRA cannot express; {_ALTERNATIVE}"
    )


def _is_lookup(module: nn.Embedding) -> bool:
    """Whether the module's output is its rows looked up, times at most a scalar `embed_scale`,
    which PEFT's embedding LoRA multiplies its own lookup by."""
    if type(module).forward is nn.Embedding.forward:
        return True
    scale = getattr(module, "embed_scale", None)
    return isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1)


def _check_peft_wraps(model: nn.Module, parts: list[_Part]) -> None:
    """ValueError naming the first module that PEFT refuses to wrap, or would wrap as something other than the edit."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for part in parts:
        leaf = part.module_name.rsplit(".", 1)[-1]
        if model_type in _PEFT_MAMBA_MODEL_TYPES and leaf in _PEFT_MAMBA_MODULES:
            raise ValueError(
                f"{part.module_name} is named {leaf}, which PEFT's LoRA refuses to wrap in a {model_type} model (a "
                f"Mamba mixer's, whose fused kernels read the weight directly); {_ALTERNATIVE}"
            )
        module = part.edit.writer.module
        if part.kind == _EMBEDDING and not _is_lookup(module):
            raise ValueError(
                f"{part.module_name} ({type(module).__name__}) computes more than a lookup of its rows, and PEFT adds "
                "its embedding LoRA's lookup of the module's input to that output, which is not the edit; pass "
                f"include_embeddings=False, or {_ALTERNATIVE}"
            )


def _parts(model: nn.Module, structure: families.ModelStructure, edits: list[weights._Edit]) -> list[_Part]:
    """Every edit as an adapter part; raises ValueError naming what PEFT cannot express."""
    if not edits:
        raise ValueError("nothing to export: no writer is edited (no layer selected, or every scale is 0)")
    weights._check_dense(
        edits,
        f"a quantized writer, whose edit orthogonalize_model_ requantizes, which a LoRA over the quantized base "
        f"does not reproduce; {_ALTERNATIVE}",
    )
    parts = [_Part(edit, edit.writer.name.rsplit(".", 1)[0], _kind(edit.writer)) for edit in edits]
    conv1d = [part.module_name for part in parts if part.kind == _CONV1D]
    if conv1d and any(part.kind == _LINEAR for part in parts):
        raise ValueError(
            f"{conv1d[0]} is a Conv1D among nn.Linear writers, which one PEFT adapter cannot hold: its "
            f"fan_in_fan_out is one setting for all of them; {_ALTERNATIVE}"
        )
    token_embedding = structure.token_embedding.weight
    if weights.head_is_tied(model, structure) and any(e.writer.parameter is token_embedding for e in edits):
        name = next(e.writer.name for e in edits if e.writer.parameter is token_embedding)
        raise ValueError(
            f"{name} is tied to the output head: PEFT merges an embedding LoRA into the shared matrix, so "
            "merge_and_unload() would change the head too; pass include_embeddings=False, or use "
            "orthogonalize_model_ and save_abliterated, which unties the head"
        )
    _check_peft_wraps(model, parts)
    return parts


def _tensors(part: _Part) -> dict[str, torch.Tensor]:
    """The adapter's tensors for one part, on the CPU, keyed as PEFT saves them."""
    edit, key = part.edit, f"{_KEY_PREFIX}{part.module_name}"
    parameter = edit.writer.parameter.detach()
    if part.kind == _BIAS:
        edited = ops.ablate_(parameter.clone(), edit.direction, edit.scale)
        return {f"{key}.base_layer.bias": edited.cpu()}
    projection, _ = weights._projection(parameter, edit.writer.layout, edit.direction)
    a_key, b_key = _WEIGHT_KEYS[part.kind]
    return {
        f"{key}.{a_key}": projection.reshape(RANK, -1).cpu().contiguous(),
        f"{key}.{b_key}": (-edit.scale * edit.direction).reshape(-1, RANK).cpu().contiguous(),
    }


def _targets(parts: list[_Part]) -> tuple[str, ...]:
    """The targeted module names, each once (a weight and its bias share one), in the model's order."""
    return tuple(dict.fromkeys(part.module_name for part in parts))


def _config(peft, model: nn.Module, parts: list[_Part]):
    """The LoraConfig that makes PEFT apply B A unscaled to exactly these modules."""
    kinds = {part.kind for part in parts}
    return peft.LoraConfig(
        r=RANK,
        lora_alpha=RANK,
        lora_dropout=0.0,
        target_modules=list(_targets(parts)),
        fan_in_fan_out=_CONV1D in kinds,
        bias="lora_only" if _BIAS in kinds else "none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
        inference_mode=True,
    )


def check_exportable(
    model: nn.Module, *, include_embeddings: bool = True, structure: families.StructureSpec | None = None
) -> None:
    """ValueError naming the first writer of `model` an adapter cannot express (see the module
    docstring), before any direction is known: the check `export_lora` makes, for every writer."""
    _, d_model = model_shape(model)
    described, _, edits, _ = weights._plan(model, torch.ones(d_model), 1.0, include_embeddings, None, structure)
    _parts(model, described, edits)


def export_lora(
    model: nn.Module,
    direction: torch.Tensor,
    out_dir: str | os.PathLike[str],
    *,
    scale: float | Schedule = 1.0,
    include_embeddings: bool = True,
    layers: Sequence[int] | None = None,
    overwrite: bool = False,
    structure: families.StructureSpec | None = None,
    metadata: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> LoRAExport:
    """Write a rank-1 PEFT LoRA adapter that turns `model` into `orthogonalize_model_(model, direction, ...)`.

    `peft.PeftModel.from_pretrained(base, out_dir)` on the unedited model then gives the
    orthogonalized one, with the adapter active or after `merge_and_unload()` (see the module
    docstring for what each writer stores). `model` is read, never changed.

    Args:
        model, direction, scale, include_embeddings, layers, structure: as in `orthogonalize_model_`.
            There is no norm_preserving: that edit is not low rank.
        out_dir: the adapter directory, written atomically (`saving.atomic_directory`).
        overwrite: replace an existing non-empty out_dir.
        metadata: a mapping saved as refusal_kernels.json beside the adapter (tensors become
            lists), with the source model and this package's version; None writes no such file.
        verify: first run `check_structure`, which raises ResidualLeakError if the structure
            read would leave r in the residual stream.

    Returns:
        A LoRAExport: the directory, the target modules, the rank and the adapter's size.

    Raises:
        ValueError/TypeError: a bad argument (named), a writer PEFT cannot express (named), or
            nothing to export; all before anything is written.
        FileExistsError: out_dir exists and is not empty, unless overwrite=True.
        ImportError: PEFT is not installed.
    """
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping or None, got {type(metadata).__name__}")
    peft = _import_peft()
    described, _, edits, _ = weights._plan(model, direction, scale, include_embeddings, layers, structure)
    parts = _parts(model, described, edits)
    if verify:
        weights.check_structure(
            model, direction, include_embeddings=include_embeddings, layers=layers, structure=structure
        )
    config = _config(peft, model, parts)
    record = None if metadata is None else saving.checkpoint_record(model, metadata)
    with saving.atomic_directory(out_dir, overwrite, saving.protected_sources(model)) as temporary:
        with torch.no_grad():
            tensors = {key: tensor for part in parts for key, tensor in _tensors(part).items()}
        save_file(tensors, str(temporary / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(temporary))
        if record is not None:
            (temporary / saving.METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
    path = Path(out_dir).expanduser().resolve()
    return LoRAExport(
        path,
        _targets(parts),
        RANK,
        sum(tensor.numel() for tensor in tensors.values()),
        sum(file.stat().st_size for file in path.iterdir() if file.is_file()),
    )
