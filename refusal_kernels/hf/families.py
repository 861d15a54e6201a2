"""Where a transformers causal LM writes into its residual stream, read from its own forward pass.

This is the only module that knows transformers module names; hooks, weights, scoring and the
checkpoint streamer all use `describe_model`. A model is read, not looked up in a list:

  * the decoder is `model.get_decoder()` (the language model of a multimodal checkpoint: its
    vision tower and projector are never read or edited), and its layers are the entries of
    the nn.ModuleList in it that holds the most parameters;
  * one short forward pass (`probe`) records every module's residual-shaped output. A layer's
    output minus its input is a sum of a few of them, each times a constant: these are the
    layer's *sites*, the tensors it adds to the residual. This covers sequential and parallel
    blocks, residual multipliers, and layers of mixed kinds (attention, linear attention, Mamba,
    short convolutions, MLP, MoE) under any names;
  * a site that is a norm (its output does not change when its input is doubled) is a
    post-sublayer norm: its input is in turn a sum of sublayer outputs (OLMo 2, GLM-4, Gemma 2/3
    sandwich norms). Writing through it needs an RMS norm, g * y / rms(y);
  * the writers behind a site are the projections whose outputs sum to the site's output
    (an attention's o_proj, a Mamba mixer's out_proj, an MLP's down_proj or fc2), found the
    same way; where no fixed sum exists (a MoE block weights its experts per token), every
    output projection in the site's subtree (OUTPUT_PROJECTION_NAMES) and every fused experts
    parameter is one. A projection is an nn.Linear, a GPT-2 Conv1D, or a module holding a
    quantized weight that `refusal_kernels.quant.find_quantized_weight` recognizes; its bias,
    if any, is a writer too;
  * the embeddings are the nn.Embedding outputs that sum to the first layer's input (token and
    learned position embeddings). If a norm stands between them (BLOOM), their write cannot be
    edited in the weights: `ModelStructure.embedding_problem` says why.

A site is an ATTENTION site (any token mixer) unless its path in the layer, or else its class,
names an MLP or experts (MLP_WORDS); a `Schedule` scales the two kinds apart.

A model on the meta device (the streaming skeleton of `orthogonalize_checkpoint`) cannot run:
its layers are read from their children's names instead (ATTENTION_NAMES, MLP_NAMES,
OUTPUT_PROJECTION_NAMES and Gemma 2/3's sandwich norms). A model nothing can read takes a
`StructureSpec` (see there). Anything that does not fit raises StructureError naming the module.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import quant
from . import probe
from .writes import written_tensor

# Words that name a sublayer's kind in its path inside the layer, or in its class name.
ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "moe", "ffn", "feed_forward", "feedforward", "expert", "block_sparse")
# Output projections inside a site with no fixed sum (MoE blocks), and in the meta-device reading.
OUTPUT_PROJECTION_NAMES = (
    "o_proj",
    "out_proj",
    "c_proj",
    "dense",
    "down_proj",
    "w2",
    "fc2",
    "fc_out",
    "dense_4h_to_h",
    "wo",
)
# Sublayer names for the meta-device reading, which cannot run the probe.
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "linear_attn", "mixer")
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "ffn", "moe")
FUSED_EXPERT_OUTPUT_NAME = "down_proj"  # a 3-D nn.Parameter of a fused experts module
EXPERT_OUTPUT_NAMES = ("output_linear",)  # experts modules whose 3-D `weight` writes (JetMoE)
FUSED_EXPERT_OUTPUT_BIAS_NAME = "down_proj_bias"
SANDWICH_NORM_NAMES = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
# The layer norms the meta-device reading understands: pre-norm (Llama, Qwen, Mistral, Phi-3;
# GPT-2) and Gemma 2/3's sandwich.
KNOWN_NORM_LAYOUTS = (
    frozenset({"input_layernorm", "post_attention_layernorm"}),
    frozenset({"input_layernorm", "post_attention_layernorm", *SANDWICH_NORM_NAMES}),
    frozenset({"ln_1", "ln_2"}),
)
ATTENTION_POST_NORM_NAME = "post_attention_layernorm"
MLP_POST_NORM_NAME = "post_feedforward_layernorm"

# How a writer's parameter maps onto the residual stream (d_model):
#   "matrix": [..., d_model, d_in], as nn.Linear stores it: W <- W - s u (u^T W) (orthogonalize_)
#   "rows":   [..., d_model], each row a residual vector (embedding rows, biases, GPT-2's
#             Conv1D [d_in, d_model], transposed experts): every row ablated (ablate_)
MATRIX = "matrix"
ROWS = "rows"

# The part of the model a writer belongs to; a `Schedule` gives each its own scale per layer.
EMBEDDING = "embedding"
ATTENTION = "attention"
MLP = "mlp"
COMPONENTS = (ATTENTION, MLP)

_STRUCTURE_ATTRIBUTE = "_refusal_kernels_structure"


class StructureError(ValueError):
    """The model has a part that `describe_model` cannot classify; the message names it."""


@dataclass(frozen=True)
class ResidualWriter:
    """One parameter whose values are added to the residual stream.

    name: the tensor's name in the model's state dict (a parameter, or a quantized module's
        stored weight such as GPTQ's qweight buffer).
    parameter: that tensor.
    layout: MATRIX or ROWS, see above.
    layer: the decoder layer it belongs to; None for embeddings.
    component: EMBEDDING, ATTENTION (a token mixer's output projection and its bias) or MLP
        (down projections, experts, shared experts and their biases).
    post_norm: the norm applied to its output before the residual add (Gemma 2/3, OLMo 2), else None.
    post_norm_weight_name: the name of that norm's weight parameter, else None.
    quantized: the quantized weight of a quantized projection (layout MATRIX), else None.
    module: the module whose output this tensor makes (the projection, the fused experts, the
        embedding): what the self-check hooks to simulate the edit.
    in_forward: whether that module's forward ran on the structure probe (JetMoE's experts are
        called through other methods): the self-check edits such a tensor itself, and puts it back.
    """

    name: str
    parameter: torch.Tensor
    layout: str
    layer: int | None
    component: str
    post_norm: nn.Module | None = None
    post_norm_weight_name: str | None = None
    quantized: quant.QuantizedWeight | None = None
    module: nn.Module | None = field(default=None, compare=False)
    in_forward: bool = True

    @property
    def storage(self) -> tuple[torch.Tensor, ...]:
        """Every tensor that orthogonalizing this writer changes."""
        return self.quantized.storage if self.quantized is not None else (self.parameter,)


@dataclass(frozen=True)
class Site:
    """One tensor a layer adds to its residual stream: the output of `module` (a sublayer, or
    the norm applied to a sublayer's output, `post_norm`), of kind ATTENTION or MLP."""

    name: str
    module: nn.Module
    component: str
    post_norm: bool = False


@dataclass(frozen=True)
class LayerStructure:
    """A decoder layer, the sites it writes through and the writers behind them."""

    index: int
    name: str
    layer: nn.Module
    sites: tuple[Site, ...]
    writers: tuple[ResidualWriter, ...]


@dataclass(frozen=True)
class ModelStructure:
    """What `describe_model` found: d_model, the layer list's name, the layers and the embedding writers.

    embedding_problem: why the embeddings' write cannot be orthogonalized in the weights (a
    norm between them and the residual stream), else None.
    unread: for `layers_only`, why the sites could not be read (each layer is then its own
    site, and there are no writers); else None.
    """

    hidden_size: int
    layers_name: str
    layers: tuple[LayerStructure, ...]
    embeddings: tuple[ResidualWriter, ...]
    token_embedding: nn.Embedding
    embedding_problem: str | None = None
    unread: str | None = None

    @property
    def has_post_norms(self) -> bool:
        return any(site.post_norm for layer in self.layers for site in layer.sites)

    def writers(self, layers: set[int] | None = None, include_embeddings: bool = True) -> list[ResidualWriter]:
        """Every residual writer, optionally restricted to some layers and without embeddings."""
        found = list(self.embeddings) if include_embeddings else []
        for layer in self.layers:
            if layers is None or layer.index in layers:
                found.extend(layer.writers)
        return found


@dataclass(frozen=True)
class StructureSpec:
    """The structure of a model, named by hand where `describe_model` cannot read it.

    layers: the nn.ModuleList of decoder layers, e.g. "model.layers".
    writers: for every layer, each output projection's path inside the layer and its component,
        e.g. {"self_attn.o_proj": "attention", "mlp.down_proj": "mlp"}. A path may be missing
        from some layers (hybrid models), not from all. A path names an nn.Linear, a Conv1D, a
        quantized linear, or a fused experts module (its `down_proj` parameter).
    post_norms: a writer's path -> the path of the RMS norm applied to its output before the
        residual add, e.g. {"self_attn.o_proj": "post_attention_layernorm"}.

    Pass it as `structure=` to `patch` or `orthogonalize_model_`, or attach it once with
    `set_structure(model, spec)` so that the pipeline (`find_direction`, `search`) uses it too.
    """

    layers: str
    writers: Mapping[str, str]
    post_norms: Mapping[str, str] = field(default_factory=dict)


def set_structure(model: nn.Module, spec: StructureSpec | None) -> None:
    """Make every later `describe_model(model)` use `spec` (None goes back to reading the model)."""
    if spec is not None and not isinstance(spec, StructureSpec):
        raise TypeError(f"spec must be a StructureSpec or None, got {type(spec).__name__}")
    model.__dict__["_refusal_kernels_spec"] = spec
    model.__dict__.pop(_STRUCTURE_ATTRIBUTE, None)


def _component(path: str, module: nn.Module) -> str:
    """The sublayer's kind, from its path in the layer if that names attention or an MLP, else
    from its class (Nemotron-H calls every sublayer `mixer`); ATTENTION when neither does."""
    for words in (path.lower(), type(module).__name__.lower()):
        if any(word in words for word in ATTENTION_WORDS):
            return ATTENTION
        if any(word in words for word in MLP_WORDS):
            return MLP
    return ATTENTION


def _quantized_weight(
    module: nn.Module, name: str, hidden_size: int, find=quant.find_quantized_weight
) -> quant.QuantizedWeight | None:
    """The quantized weight `module` holds (found by `find`), or None; a layout that does not add up
    raises, naming the module."""
    try:
        return find(module, out_features=hidden_size)
    except ValueError as error:
        raise StructureError(f"{name} ({type(module).__name__}): {error}") from error
    except TypeError as error:
        raise TypeError(f"{name} ({type(module).__name__}): {error}") from error


def _is_projection(module: nn.Module, name: str, hidden_size: int) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or _quantized_weight(module, name, hidden_size) is not None


def _fused_experts_parameter(module: nn.Module, leaf: str) -> str | None:
    """The name of a fused experts module's output parameter: `down_proj`, or the 3-D `weight` of
    an experts module named like an output projection (JetMoE's `output_linear`)."""
    if isinstance(module._parameters.get(FUSED_EXPERT_OUTPUT_NAME), nn.Parameter):
        return FUSED_EXPERT_OUTPUT_NAME
    weight = module._parameters.get("weight")
    if leaf in EXPERT_OUTPUT_NAMES and isinstance(weight, nn.Parameter) and weight.dim() == 3:
        return "weight"
    return None


@dataclass(frozen=True)
class _Context:
    """What every writer of one site shares."""

    hidden_size: int
    layer: int
    component: str
    post_norm: tuple[nn.Module, str] | None


def _projection_writers(module: nn.Module, name: str, context: _Context) -> list[ResidualWriter]:
    """The weight (and bias) of an nn.Linear, GPT-2 Conv1D or quantized linear that outputs d_model."""
    hidden_size = context.hidden_size
    norm, norm_weight = context.post_norm if context.post_norm else (None, None)
    # Quantized first: bitsandbytes and torchao layers are nn.Linear subclasses.
    quantized = _quantized_weight(module, name, hidden_size)
    weight_name, layout, outputs = "weight", MATRIX, None
    if quantized is not None:
        weight_name, outputs = quantized.tensor_name, quantized.shape[0]
    elif isinstance(module, nn.Linear):
        outputs = module.out_features
    elif isinstance(module, Conv1D):
        layout, outputs = ROWS, module.nf  # stored [d_in, d_model]: y = x W + b, so each row of W is a residual vector
    if outputs != hidden_size:
        raise StructureError(
            f"{name} ({type(module).__name__}): expected an nn.Linear, Conv1D or quantized linear with "
            f"{hidden_size} outputs"
        )
    weight = getattr(module, weight_name)
    common = {"layer": context.layer, "component": context.component, "post_norm": norm}
    writers = [
        ResidualWriter(
            f"{name}.{weight_name}",
            weight,
            layout,
            **common,
            post_norm_weight_name=norm_weight,
            quantized=quantized,
            module=module,
        )
    ]
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        writers.append(
            ResidualWriter(f"{name}.bias", bias, ROWS, **common, post_norm_weight_name=norm_weight, module=module)
        )
    return writers


def _fused_expert_writers(
    experts: nn.Module, name: str, context: _Context, parameter: str = FUSED_EXPERT_OUTPUT_NAME
) -> list[ResidualWriter]:
    """A fused experts module: down_proj [E, d_model, d_ff], or [E, d_ff, d_model] when transposed
    (dense only: quantized experts are [E, d_model, d_ff]); an experts `weight` is [E, d_model, d_in]."""
    hidden_size = context.hidden_size
    norm, norm_weight = context.post_norm if context.post_norm else (None, None)
    weight = getattr(experts, parameter)
    quantized = _quantized_weight(experts, name, hidden_size, quant.find_quantized_experts)
    if quantized is not None:
        layout = MATRIX
    elif parameter == FUSED_EXPERT_OUTPUT_NAME:
        layout = _dense_experts_layout(weight, name, hidden_size, experts)
    elif weight.shape[-2] == hidden_size:
        layout = MATRIX
    else:
        raise StructureError(
            f"{name}.{parameter} has shape {tuple(weight.shape)}, which does not write {hidden_size}-wide vectors"
        )
    common = {"layer": context.layer, "component": MLP, "post_norm": norm, "post_norm_weight_name": norm_weight}
    writers = [ResidualWriter(f"{name}.{parameter}", weight, layout, **common, quantized=quantized, module=experts)]
    bias_name = FUSED_EXPERT_OUTPUT_BIAS_NAME if parameter == FUSED_EXPERT_OUTPUT_NAME else "bias"
    bias = getattr(experts, bias_name, None)
    if isinstance(bias, nn.Parameter):
        writers.append(ResidualWriter(f"{name}.{bias_name}", bias, ROWS, **common, module=experts))
    return writers


def _dense_experts_layout(weight: torch.Tensor, name: str, hidden_size: int, experts: nn.Module) -> str:
    transposed = getattr(experts, "is_transposed", None)
    rows_fit, matrix_fit = weight.shape[-1] == hidden_size, weight.shape[-2] == hidden_size
    if transposed is None and rows_fit and matrix_fit:
        raise StructureError(
            f"{name}.{FUSED_EXPERT_OUTPUT_NAME} has shape {tuple(weight.shape)}: cannot tell which axis is d_model"
        )
    layout = ROWS if (transposed if transposed is not None else rows_fit) else MATRIX
    if weight.dim() != 3 or not (rows_fit if layout == ROWS else matrix_fit):
        raise StructureError(
            f"{name}.{FUSED_EXPERT_OUTPUT_NAME} has shape {tuple(weight.shape)}, which does not write "
            f"{hidden_size}-wide vectors in its {'last' if layout == ROWS else 'second-to-last'} dim"
        )
    return layout


def _named_output_writers(module: nn.Module, name: str, context: _Context) -> list[ResidualWriter]:
    """Every output projection (by name) and fused experts parameter in a sublayer's subtree."""
    writers: list[ResidualWriter] = []
    for sub_name, sub in module.named_modules():
        full_name = f"{name}.{sub_name}" if sub_name else name
        leaf = (sub_name or name).rsplit(".", 1)[-1]
        parameter = _fused_experts_parameter(sub, leaf)
        if parameter is not None:
            writers += _fused_expert_writers(sub, full_name, context, parameter)
        elif leaf in OUTPUT_PROJECTION_NAMES and _is_projection(sub, full_name, context.hidden_size):
            writers += _projection_writers(sub, full_name, context)
        elif (bias := _own_output_bias(sub, context.hidden_size)) is not None:
            norm, norm_weight = context.post_norm or (None, None)
            writers.append(
                ResidualWriter(
                    f"{full_name}.bias", bias, ROWS, context.layer, context.component, norm, norm_weight, module=sub
                )
            )
    if not writers:
        raise StructureError(
            f"{name} ({type(module).__name__}): found no output projection (one of {OUTPUT_PROJECTION_NAMES}, "
            f"or a fused experts parameter '{FUSED_EXPERT_OUTPUT_NAME}')"
        )
    return writers


def _own_output_bias(module: nn.Module, hidden_size: int) -> torch.Tensor | None:
    """A [d_model] `bias` that a sublayer adds to its output itself (JetMoE's MoE), else None; a
    module with a weight of its own (a norm, a projection) is not one."""
    bias = module._parameters.get("bias")
    if isinstance(bias, nn.Parameter) and tuple(bias.shape) == (hidden_size,) and "weight" not in module._parameters:
        return bias
    return None


def _post_norm(norm: nn.Module, name: str, hidden_size: int) -> tuple[nn.Module, str]:
    """A post-sublayer norm and its weight's name; it must be an RMS norm to write through."""
    weight = getattr(norm, "weight", None)
    if (
        not isinstance(weight, nn.Parameter)
        or tuple(weight.shape) != (hidden_size,)
        or getattr(norm, "bias", None) is not None
    ):
        raise StructureError(
            f"{name} ({type(norm).__name__}): a post-sublayer norm must be an RMS norm with a "
            f"[{hidden_size}] weight and no bias"
        )
    return norm, f"{name}.weight"


def _is_norm(module: nn.Module, call: probe.Call | None) -> bool:
    """A leaf module with only [d] parameters whose output does not change when its input is doubled."""
    if call is None or call.input is None or any(True for _ in module.children()):
        return False
    parameters = list(module.parameters())
    if not parameters or any(p.dim() != 1 for p in parameters):
        return False
    weight = parameters[0]
    x = call.input.to(device=weight.device, dtype=weight.dtype)[None]
    try:
        with torch.no_grad():
            once, twice = written_tensor(module(x)).float(), written_tensor(module(2 * x)).float()
    except (TypeError, RuntimeError, ValueError):  # it takes other inputs (a residual gate): not a norm
        return False
    return once.shape == twice.shape and bool(
        torch.allclose(once, twice, rtol=1e-2, atol=1e-3 * float(once.abs().max()))
    )


class _LayerReader:
    """Reads one layer's sites and writers from the probe's recording."""

    def __init__(self, index: int, name: str, layer: nn.Module, hidden_size: int, recording: probe.Recording):
        self.index, self.name, self.layer, self.hidden_size = index, name, layer, hidden_size
        self.recording = recording
        self.recorded = [
            (path, module, call)
            for path, module in layer.named_modules()
            if path and (call := recording.of(module)) is not None and call.output is not None
        ]

    def _terms(self, target: torch.Tensor, within: str = "", exclude: frozenset[str] = frozenset()) -> list[str] | None:
        """The paths of the fewest modules under `within` whose outputs sum to `target`, leaving out
        each path in `exclude` with its descendants and ancestors (what contains a module cannot
        have made its input)."""
        candidates = [
            (path, call.output)
            for path, _, call in self.recorded
            if (not within or path.startswith(f"{within}."))
            and not any(path == e or path.startswith(f"{e}.") or e.startswith(f"{path}.") for e in exclude)
        ]
        return probe.combination(target, candidates, target.norm(dim=-1), self.recording.dtype)

    def read(self) -> LayerStructure:
        call = self.recording.calls.get(self.layer)
        if call is None or call.input is None or call.output is None:
            raise StructureError(
                f"{self.name} ({type(self.layer).__name__}): the probe's forward pass did not run it on one "
                "[tokens, d_model] residual state (several residual streams, say)"
            )
        candidates = [(path, c.output) for path, _, c in self.recorded if not torch.equal(c.output, call.input)]
        delta, scale, dtype = call.output - call.input, call.output.norm(dim=-1), self.recording.dtype
        terms = probe.combination(delta, candidates, scale, dtype)
        if terms is None:
            # A layer may also scale its residual (MiniMax's alpha), which keeps it orthogonal to r:
            # the input is then one more term, not a site. Only as a last resort, since a sublayer
            # that adds the residual itself (MPT's MLP) would otherwise be read as the whole write.
            terms = probe.combination(delta, [("", call.input), *candidates], scale, dtype)
        if terms is None:
            raise StructureError(
                f"{self.name} ({type(self.layer).__name__}): its output is not its input plus a sum of its "
                "submodules' outputs"
            )
        sites, writers = [], []
        for path in filter(None, terms):
            found = self._writers(path, None, None)
            sites.append(
                Site(
                    f"{self.name}.{path}",
                    self.layer.get_submodule(path),
                    found[0].component,
                    any(w.post_norm is not None for w in found),
                )
            )
            writers += found
        writers = [dataclasses.replace(w, in_forward=w.module in self.recording.calls) for w in writers]
        return LayerStructure(self.index, self.name, self.layer, tuple(sites), tuple(writers))

    def _writers(
        self,
        path: str,
        component: str | None,
        post_norm: tuple[nn.Module, str] | None,
        seen: frozenset[str] = frozenset(),
    ) -> list[ResidualWriter]:
        """The writers behind the output of the module at `path`: itself if it is a projection;
        behind its input if it is a norm (a post-sublayer norm, anywhere in the sublayer); else
        the modules whose outputs sum to its output, or its output projections by name. The
        component is that of the first path below any norm."""
        module, name = self.layer.get_submodule(path), f"{self.name}.{path}"
        call = self.recording.of(module)
        if _is_norm(module, call):
            producers = self._terms(call.input, exclude=seen | {path}) if post_norm is None else None
            if producers is None:
                raise StructureError(
                    f"{name} ({type(module).__name__}): normalizes a write into the residual stream that is not a "
                    "sum of sublayer outputs"
                )
            norm = _post_norm(module, name, self.hidden_size)
            return [w for producer in producers for w in self._writers(producer, component, norm, seen | {path})]
        if call is not None and call.input is not None and torch.equal(call.input, call.output):
            # An identity in eval mode (dropout): the writers are behind what it passes on.
            producers = self._terms(call.input, exclude=seen | {path})
            if producers is not None:
                return [w for p in producers for w in self._writers(p, component, post_norm, seen | {path})]
        context = _Context(self.hidden_size, self.index, component or _component(path, module), post_norm)
        if _is_projection(module, name, self.hidden_size):
            return _projection_writers(module, name, context)
        terms = self._terms(call.output, within=path) if call is not None and call.output is not None else None
        if terms is None:
            return _named_output_writers(module, name, context)
        return [w for term in terms for w in self._writers(term, context.component, post_norm, seen)]


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def _read_layer_by_names(index: int, name: str, layer: nn.Module, hidden_size: int) -> LayerStructure:
    """The meta-device reading: one attention child and one MLP child, by name; sandwich norms.

    Only the norm arrangements in KNOWN_NORM_LAYOUTS are read; any other (OLMo 2's post-norms,
    GLM-4's sandwich under other names) raises, since names alone cannot tell where they sit."""
    norms = frozenset(n for n, child in layer.named_children() if "norm" in type(child).__name__.lower())
    if norms not in KNOWN_NORM_LAYOUTS:
        raise StructureError(
            f"{name} ({type(layer).__name__}): its norms {sorted(norms)} are not an arrangement the meta-device "
            "reading knows; load the model and use orthogonalize_model_, which reads it from a forward pass"
        )
    sandwich = all(isinstance(getattr(layer, n, None), nn.Module) for n in SANDWICH_NORM_NAMES)
    sites, writers = [], []
    for names, component, norm_name in (
        (ATTENTION_NAMES, ATTENTION, ATTENTION_POST_NORM_NAME),
        (MLP_NAMES, MLP, MLP_POST_NORM_NAME),
    ):
        found = _child(layer, names)
        if found is None:
            raise StructureError(
                f"{name} ({type(layer).__name__}): found no {component} child (one of {names}) to read on the meta device"
            )
        child_name, child = found
        post_norm = _post_norm(getattr(layer, norm_name), f"{name}.{norm_name}", hidden_size) if sandwich else None
        site, site_name = (post_norm[0], f"{name}.{norm_name}") if post_norm else (child, f"{name}.{child_name}")
        sites.append(Site(site_name, site, component, post_norm is not None))
        context = _Context(hidden_size, index, component, post_norm)
        writers += _named_output_writers(child, f"{name}.{child_name}", context)
    return LayerStructure(index, name, layer, tuple(sites), tuple(writers))


def _read_layer_by_spec(
    index: int, name: str, layer: nn.Module, hidden_size: int, spec: StructureSpec
) -> LayerStructure:
    sites, writers = [], []
    for path, component in spec.writers.items():
        try:
            module = layer.get_submodule(path)
        except AttributeError:
            continue
        post_norm, site, site_name = None, module, f"{name}.{path}"
        norm_path = spec.post_norms.get(path)
        if norm_path is not None:
            try:
                norm = layer.get_submodule(norm_path)
            except AttributeError:
                raise ValueError(f"structure.post_norms[{path!r}]: {name} has no module {norm_path!r}") from None
            post_norm = _post_norm(norm, f"{name}.{norm_path}", hidden_size)
            site, site_name = norm, f"{name}.{norm_path}"
        context = _Context(hidden_size, index, component, post_norm)
        parameter = _fused_experts_parameter(module, path.rsplit(".", 1)[-1])
        if parameter is not None:
            found = _fused_expert_writers(module, f"{name}.{path}", context, parameter)
        elif _is_projection(module, f"{name}.{path}", hidden_size):
            found = _projection_writers(module, f"{name}.{path}", context)
        else:
            raise ValueError(
                f"structure.writers[{path!r}]: {name}.{path} ({type(module).__name__}) is not a projection "
                "(nn.Linear, Conv1D, quantized linear) or fused experts module"
            )
        sites.append(Site(site_name, site, component, post_norm is not None))
        writers += found
    if not sites:
        raise ValueError(f"structure.writers: none of {list(spec.writers)} is in {name}")
    return LayerStructure(index, name, layer, tuple(sites), tuple(writers))


def _check_spec(model: nn.Module, spec: StructureSpec) -> nn.ModuleList:
    if not isinstance(spec, StructureSpec):
        raise TypeError(f"structure must be a StructureSpec, got {type(spec).__name__}")
    try:
        layers = model.get_submodule(spec.layers)
    except AttributeError:
        raise ValueError(f"structure.layers: {type(model).__name__} has no module {spec.layers!r}") from None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"structure.layers: {spec.layers!r} is a {type(layers).__name__}, not a non-empty nn.ModuleList"
        )
    for path, component in spec.writers.items():
        if component not in COMPONENTS:
            raise ValueError(f"structure.writers[{path!r}] must be one of {COMPONENTS}, got {component!r}")
        if not any(_has_submodule(layer, path) for layer in layers):
            raise ValueError(f"structure.writers: no layer of {spec.layers!r} has a module {path!r}")
    for path in spec.post_norms:
        if path not in spec.writers:
            raise ValueError(f"structure.post_norms names {path!r}, which is not in structure.writers")
    return layers


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """The language model inside `model` (itself for a plain decoder) and its name: what
    `get_decoder()` returns, if it holds the input embeddings (some models call their LM head
    `decoder`)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    embedding = model.get_input_embeddings()
    if isinstance(decoder, nn.Module) and any(m is embedding for m in decoder.modules()):
        for name, module in model.named_modules():
            if module is decoder:
                return name, decoder
    return "", model


def decoder_of(model: nn.Module) -> nn.Module:
    """The language model inside `model` that `describe_model` reads (see `_decoder`)."""
    return _decoder(model)[1]


def _find_layer_list(model: nn.Module, recording: probe.Recording | None = None) -> tuple[str, nn.ModuleList]:
    """The nn.ModuleList of the decoder that holds the most parameters (experts lists live inside
    layers); with the probe's `recording`, only lists whose first entry ran on d_model-wide states."""
    prefix, decoder = _decoder(model)
    best, most = None, 0
    for name, module in decoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if recording is not None:
                call = recording.calls.get(module[0])
                if call is None or not call.on_stream:
                    continue
            count = sum(p.numel() for p in module.parameters())
            if count > most:
                best, most = (f"{prefix}.{name}" if prefix else name, module), count
    if best is None:
        raise StructureError(f"{type(model).__name__}: found no nn.ModuleList of decoder layers with parameters")
    return best


def _token_embedding(model: nn.Module) -> nn.Embedding:
    token_embedding = model.get_input_embeddings()
    if not isinstance(token_embedding, nn.Embedding):
        raise StructureError(f"{type(model).__name__}.get_input_embeddings() is not an nn.Embedding")
    return token_embedding


def _embedding_modules(
    model: nn.Module, list_name: str, token_embedding: nn.Embedding
) -> list[tuple[str, nn.Embedding]]:
    """The token embedding and every other nn.Embedding of width d_model outside the layers (learned positions)."""
    prefix, _ = _decoder(model)
    found = []
    for name, module in model.named_modules():
        if name.startswith(f"{list_name}.") or not isinstance(module, nn.Embedding):
            continue
        inside = not prefix or name.startswith(f"{prefix}.")
        if module is token_embedding or (inside and module.embedding_dim == token_embedding.embedding_dim):
            found.append((name, module))
    return found


def _embedding_writers(embeddings: list[tuple[str, nn.Embedding]]) -> tuple[ResidualWriter, ...]:
    return tuple(ResidualWriter(f"{n}.weight", m.weight, ROWS, None, EMBEDDING, module=m) for n, m in embeddings)


def _read_embeddings(
    model: nn.Module, embeddings: list[tuple[str, nn.Embedding]], first_input: torch.Tensor, recording: probe.Recording
) -> tuple[list[tuple[str, nn.Embedding]], str | None]:
    """The embeddings whose outputs sum to the first layer's input, or the reason none can be edited."""
    outputs = [
        (n, call.output) for n, m in embeddings if (call := recording.of(m)) is not None and call.output is not None
    ]
    terms = probe.combination(first_input, outputs, first_input.norm(dim=-1), recording.dtype)
    if terms is not None:
        return [(n, m) for n, m in embeddings if n in terms], None
    source = next(
        (
            f"{name} ({type(module).__name__})"
            for name, module in model.named_modules()
            if (call := recording.of(module)) is not None
            and call.output is not None
            and not isinstance(module, nn.Embedding)
            and torch.equal(call.output, first_input)
            and not (call.input is not None and torch.equal(call.input, call.output))  # not dropout
        ),
        "a computation outside any module (fixed position encodings, say)",
    )
    return (
        embeddings,
        f"the first layer's input is not a sum of the embeddings' outputs: it comes from {source}, so the "
        "embeddings' write cannot be orthogonalized in the weights",
    )


def _record(model: nn.Module, token_embedding: nn.Embedding) -> probe.Recording:
    """The probe's forward pass over the decoder, with every module of it recorded (ProbeError if it fails)."""
    prefix, decoder = _decoder(model)
    ids = probe.probe_ids(token_embedding.num_embeddings, execution_device(token_embedding))
    modules = {f"{prefix}.{n}".strip("."): m for n, m in decoder.named_modules()}
    return probe.record(decoder, modules, token_embedding.embedding_dim, ids)


def _numbered(list_name: str, layer_list: nn.ModuleList) -> list[tuple[int, str, nn.Module]]:
    return [(i, f"{list_name}.{i}", layer) for i, layer in enumerate(layer_list)]


def _read(model: nn.Module, spec: StructureSpec | None) -> ModelStructure:
    token_embedding = _token_embedding(model)
    hidden_size = token_embedding.embedding_dim
    problem, recording = None, None
    if spec is not None:
        layer_list, list_name = _check_spec(model, spec), spec.layers
        layers = [_read_layer_by_spec(i, n, m, hidden_size, spec) for i, n, m in _numbered(list_name, layer_list)]
    elif token_embedding.weight.device.type == "meta":
        list_name, layer_list = _find_layer_list(model)
        layers = [_read_layer_by_names(i, n, m, hidden_size) for i, n, m in _numbered(list_name, layer_list)]
    else:
        try:
            recording = _record(model, token_embedding)
        except probe.ProbeError as error:
            # A model whose forward fails (a corrupted quantized layout, say) is read by names, so
            # that the edit's own checks can name what is wrong; if that fails too, both are said.
            try:
                list_name, layer_list = _find_layer_list(model)
                layers = [_read_layer_by_names(i, n, m, hidden_size) for i, n, m in _numbered(list_name, layer_list)]
            except StructureError as names_error:
                raise StructureError(
                    f"{type(model).__name__}: the forward pass that reads its structure failed {error}; "
                    f"reading it by names instead: {names_error}"
                ) from error
        else:
            list_name, layer_list = _find_layer_list(model, recording)
            layers = [
                _LayerReader(i, n, m, hidden_size, recording).read() for i, n, m in _numbered(list_name, layer_list)
            ]
    embeddings = _embedding_modules(model, list_name, token_embedding)
    if recording is not None:
        first = recording.calls[layer_list[0]]
        embeddings, problem = _read_embeddings(model, embeddings, first.input, recording)
    return ModelStructure(
        hidden_size, list_name, tuple(layers), _embedding_writers(embeddings), token_embedding, problem
    )


def layers_only(model: nn.Module, why: str) -> ModelStructure:
    """The decoder layers with each layer as its one site and no writers, for hooks on a model
    whose sites cannot be read (`why`): ablating every layer's input and output still removes r
    from every residual state."""
    token_embedding = _token_embedding(model)
    try:
        recording = _record(model, token_embedding)
    except probe.ProbeError:
        recording = None
    list_name, layer_list = _find_layer_list(model, recording)
    layers = tuple(
        LayerStructure(i, name, layer, (Site(name, layer, ATTENTION),), ())
        for i, name, layer in _numbered(list_name, layer_list)
    )
    return ModelStructure(token_embedding.embedding_dim, list_name, layers, (), token_embedding, why, why)


def _fingerprint(model: nn.Module) -> tuple[int, ...]:
    """Changes when a module, parameter or buffer of the model is replaced."""
    return (
        *map(id, model.modules()),
        *(id(p) for _, p in model.named_parameters(remove_duplicate=False)),
        *(id(b) for _, b in model.named_buffers(remove_duplicate=False)),
    )


def describe_model(model: nn.Module, structure: StructureSpec | None = None) -> ModelStructure:
    """Find the decoder layers, their residual sites and every residual writer of a causal LM.

    Runs the probe's forward pass (see the module docstring) the first time, and again only after
    a module, parameter or buffer of the model is replaced. `structure` (or a spec attached with
    `set_structure`) names the layers and writers instead.

    Raises:
        StructureError (a ValueError): naming the module that could not be classified.
        ValueError/TypeError: a `structure` that names a missing module, naming it.
    """
    spec = structure if structure is not None else model.__dict__.get("_refusal_kernels_spec")
    key = (_fingerprint(model), id(spec))
    cached = model.__dict__.get(_STRUCTURE_ATTRIBUTE)
    if cached is not None and cached[0] == key:
        return cached[1]
    described = _read(model, spec)
    model.__dict__[_STRUCTURE_ATTRIBUTE] = (key, described)
    return described


def per_expert_checkpoint_key(structure: ModelStructure) -> re.Pattern[str]:
    """Matches checkpoint keys of experts stored one nn.Linear each ("...layers.3.mlp.experts.7.down_proj.weight").

    transformers may fuse such experts into one 3-D parameter when it loads them, so these keys
    are not in the model's state dict; group 1 is the layer index. Each is a MATRIX writer.
    """
    mlp, out = "|".join(MLP_NAMES), "|".join(OUTPUT_PROJECTION_NAMES)
    return re.compile(rf"^{re.escape(structure.layers_name)}\.(\d+)\.(?:{mlp})\.experts\.\d+\.(?:{out})\.weight$")


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The effective per-channel gain g of an RMS norm (g = w, or 1 + w in Gemma), fp32 [d].

    Read by applying the norm to a vector of ones, whose RMS is 1, so that every family's
    weight convention is covered without knowing it; the constant 1/sqrt(1 + eps) factor
    does not matter because the result is only used as a direction.
    """
    weight = norm.weight
    if weight.device.type == "meta":
        raise ValueError("norm_gain needs the norm's weight data; it is on the meta device")
    with torch.no_grad():
        return norm(torch.ones(1, weight.shape[0], dtype=torch.float32, device=weight.device)).float().reshape(-1)


def norm_gain_from_weight(norm: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`norm_gain` of a copy of `norm` (e.g. from a meta-device skeleton) that holds `weight`."""
    real = copy.deepcopy(norm).to_empty(device=weight.device)
    with torch.no_grad():
        real.weight.copy_(weight)
    return norm_gain(real)


def writer_direction(direction: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """The direction a writer must be orthogonalized against, fp32 [d].

    Without a post-norm it is `direction`. With one, the norm's output g * y / rms(y) is
    orthogonal to r iff y is orthogonal to g * r, so it is g * r (normalized).
    """
    unit = direction.float() / direction.float().norm()
    if gain is None:
        return unit
    scaled = gain.to(unit.device) * unit
    length = scaled.norm()
    if not (torch.isfinite(length) and length > 0):
        raise ValueError("direction is orthogonal to a post-sublayer norm's gain: nothing to orthogonalize against")
    return scaled / length


def check_scale(scale: float, name: str = "scale") -> float:
    """`scale` as a float; ValueError naming it (as `name`) unless it is a finite number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name} must be a finite number, got {scale!r}")
    return float(scale)


def execution_device(module: nn.Module) -> torch.device:
    """Where a module computes: its parameters' device, or, for a module accelerate offloads
    (its parameters wait on the meta device until each forward pass), its execution device."""
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device)
    return next(module.parameters()).device


def check_directions(
    direction: torch.Tensor,
    num_layers: int,
    d_model: int,
    layers: Sequence[int] | None,
    size_note: str = "",
) -> list[int]:
    """Check `direction` ([d_model] or one per layer [num_layers, d_model], finite and non-zero)
    and `layers`; returns the selected layers (all by default). `size_note` follows d_model in
    the shape's message. Raises ValueError/TypeError naming the argument."""
    if not isinstance(direction, torch.Tensor):
        raise TypeError(f"direction must be a torch.Tensor, got {type(direction).__name__}")
    if not direction.dtype.is_floating_point:
        raise TypeError(f"direction must have a floating-point dtype, got {direction.dtype}")
    if direction.shape not in ((d_model,), (num_layers, d_model)):
        raise ValueError(
            f"direction must have shape [{d_model}]{size_note} or [num_layers={num_layers}, {d_model}], "
            f"got {tuple(direction.shape)}"
        )
    norms = direction.detach().float().reshape(-1, d_model).norm(dim=-1)
    if not bool((torch.isfinite(norms) & (norms > 0)).all()):
        raise ValueError("direction must be finite and non-zero (in every row)")
    if layers is None:
        return list(range(num_layers))
    selected = [int(i) for i in layers]
    bad = [i for i in selected if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers holds {bad}, outside [0, {num_layers})")
    return selected


def layer_directions(
    direction: torch.Tensor,
    structure: ModelStructure,
    layers: list[int] | tuple[int, ...] | None,
    device: torch.device | str | None = None,
) -> dict[int, torch.Tensor]:
    """Validate `direction` ([d] or one per layer [L, d]) and `layers`; fp32 [d] per selected layer.

    Each vector is placed on `device`, by default where its layer computes. Raises
    ValueError/TypeError naming the argument.
    """
    selected = check_directions(direction, len(structure.layers), structure.hidden_size, layers)
    result = {}
    for i in selected:
        row = direction if direction.dim() == 1 else direction[i]
        target = device if device is not None else execution_device(structure.layers[i].layer)
        result[i] = row.detach().to(device=target, dtype=torch.float32).contiguous()
    return result
