"""Where a transformers causal LM writes into its residual stream, found from module structure.

This is the only module that knows transformers module names; hooks, weights and the
checkpoint streamer all use `describe_model`. Rather than a list of model classes, a model is
read by its shape:

  * the decoder layers are the entries of the one nn.ModuleList whose entries each have an
    attention child and an MLP child;
  * the attention writes through one output projection, the MLP through every down
    projection in its subtree (dense MLP, MoE experts as a module list or as a fused 3-D
    parameter, dense or quantized as `quant.find_quantized_experts` recognizes, shared experts);
  * a projection is an nn.Linear, a GPT-2 Conv1D, or a module holding a quantized weight that
    `refusal_kernels.quant.find_quantized_weight` recognizes (bitsandbytes, torchao int8 and
    float8, GPTQ, AWQ, fp8); its bias, if any, is a dense writer;
  * a layer with both a pre- and a post-feedforward norm ("sandwich" norms, Gemma 2/3) applies
    `post_attention_layernorm` to the attention output and `post_feedforward_layernorm` to the
    MLP output before adding them to the residual. Without the pre-feedforward norm,
    `post_attention_layernorm` is the norm *before* the MLP (Llama, Qwen, Mistral, Phi-3) and
    writes nothing;
  * the embeddings are the token embedding plus every other nn.Embedding of width d_model
    outside the layers (GPT-2's learned positions).

This covers Llama 2/3, Qwen2/2.5/3, Qwen2-MoE/Qwen3-MoE, Mistral, Mixtral, Gemma, Gemma 2,
Gemma 3 (text), Phi-3 and GPT-2. Anything else that does not fit raises StructureError naming
the module that could not be classified.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import quant

# The names below are the single source of truth for every part of refusal_kernels.hf.
ATTENTION_NAMES = ("self_attn", "attn", "attention")
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")
ATTENTION_OUTPUT_NAMES = ("o_proj", "c_proj", "out_proj", "dense")
MLP_OUTPUT_NAMES = ("down_proj", "c_proj", "w2", "fc2")
FUSED_EXPERT_OUTPUT_NAME = "down_proj"  # a 3-D nn.Parameter of a fused experts module
FUSED_EXPERT_OUTPUT_BIAS_NAME = "down_proj_bias"
SANDWICH_NORM_NAMES = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
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
    component: EMBEDDING, ATTENTION (the attention output projection and its bias) or MLP
        (down projections, experts, shared experts and their biases).
    post_norm: the norm applied to its output before the residual add (Gemma 2/3), else None.
    post_norm_weight_name: the name of that norm's weight parameter, else None.
    quantized: the quantized weight of a quantized projection (layout MATRIX), else None.
    """

    name: str
    parameter: torch.Tensor
    layout: str
    layer: int | None
    component: str
    post_norm: nn.Module | None = None
    post_norm_weight_name: str | None = None
    quantized: quant.QuantizedWeight | None = None

    @property
    def storage(self) -> tuple[torch.Tensor, ...]:
        """Every tensor that orthogonalizing this writer changes."""
        return self.quantized.storage if self.quantized is not None else (self.parameter,)


@dataclass(frozen=True)
class LayerStructure:
    """A decoder layer and its residual-stream sites.

    The attention site is `attention_post_norm` when set (its output is what is added to the
    residual), else `attention` (output[0]); likewise for the MLP.
    """

    index: int
    name: str
    layer: nn.Module
    attention: nn.Module
    mlp: nn.Module
    attention_post_norm: nn.Module | None
    mlp_post_norm: nn.Module | None
    writers: tuple[ResidualWriter, ...]

    @property
    def attention_site(self) -> nn.Module:
        return self.attention_post_norm if self.attention_post_norm is not None else self.attention

    @property
    def mlp_site(self) -> nn.Module:
        return self.mlp_post_norm if self.mlp_post_norm is not None else self.mlp


@dataclass(frozen=True)
class ModelStructure:
    """What `describe_model` found: d_model, the layer list's name, the layers and the embedding writers."""

    hidden_size: int
    layers_name: str
    layers: tuple[LayerStructure, ...]
    embeddings: tuple[ResidualWriter, ...]
    token_embedding: nn.Embedding

    @property
    def has_post_norms(self) -> bool:
        return any(s.attention_post_norm is not None or s.mlp_post_norm is not None for s in self.layers)

    def writers(self, layers: set[int] | None = None, include_embeddings: bool = True) -> list[ResidualWriter]:
        """Every residual writer, optionally restricted to some layers and without embeddings."""
        found = list(self.embeddings) if include_embeddings else []
        for layer in self.layers:
            if layers is None or layer.index in layers:
                found.extend(layer.writers)
        return found


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def _find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and all(_child(m, ATTENTION_NAMES) and _child(m, MLP_NAMES) for m in module)
        ):
            return name, module
    raise StructureError(
        f"{type(model).__name__}: found no nn.ModuleList of decoder layers, each with an attention child "
        f"(one of {ATTENTION_NAMES}) and an MLP child (one of {MLP_NAMES})"
    )


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


def _projection_writers(
    module: nn.Module,
    name: str,
    hidden_size: int,
    layer: int,
    component: str,
    post_norm: tuple[nn.Module, str] | None,
) -> list[ResidualWriter]:
    """The weight (and bias) of an nn.Linear, GPT-2 Conv1D or quantized linear that outputs d_model."""
    norm, norm_weight = post_norm if post_norm else (None, None)
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
    writers = [ResidualWriter(f"{name}.{weight_name}", weight, layout, layer, component, norm, norm_weight, quantized)]
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        writers.append(ResidualWriter(f"{name}.bias", bias, ROWS, layer, component, norm, norm_weight))
    return writers


def _fused_expert_writers(
    experts: nn.Module, name: str, hidden_size: int, layer: int, post_norm: tuple[nn.Module, str] | None
) -> list[ResidualWriter]:
    """A fused experts module: down_proj [E, d_model, d_ff], or [E, d_ff, d_model] when transposed
    (dense only: quantized experts are [E, d_model, d_ff])."""
    norm, norm_weight = post_norm if post_norm else (None, None)
    weight = getattr(experts, FUSED_EXPERT_OUTPUT_NAME)
    quantized = _quantized_weight(experts, name, hidden_size, quant.find_quantized_experts)
    layout = MATRIX if quantized is not None else _dense_experts_layout(weight, name, hidden_size, experts)
    writers = [
        ResidualWriter(f"{name}.{FUSED_EXPERT_OUTPUT_NAME}", weight, layout, layer, MLP, norm, norm_weight, quantized)
    ]
    bias = getattr(experts, FUSED_EXPERT_OUTPUT_BIAS_NAME, None)
    if isinstance(bias, nn.Parameter):
        bias_name = f"{name}.{FUSED_EXPERT_OUTPUT_BIAS_NAME}"
        writers.append(ResidualWriter(bias_name, bias, ROWS, layer, MLP, norm, norm_weight))
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


def _mlp_writers(
    mlp: nn.Module, name: str, hidden_size: int, layer: int, post_norm: tuple[nn.Module, str] | None
) -> list[ResidualWriter]:
    writers: list[ResidualWriter] = []
    for sub_name, sub in mlp.named_modules():
        full_name = f"{name}.{sub_name}" if sub_name else name
        leaf = sub_name.rsplit(".", 1)[-1]
        if leaf in MLP_OUTPUT_NAMES and _is_projection(sub, full_name, hidden_size):
            writers += _projection_writers(sub, full_name, hidden_size, layer, MLP, post_norm)
        elif isinstance(sub._parameters.get(FUSED_EXPERT_OUTPUT_NAME), nn.Parameter):
            writers += _fused_expert_writers(sub, full_name, hidden_size, layer, post_norm)
    if not writers:
        raise StructureError(
            f"{name} ({type(mlp).__name__}): found no output projection (one of {MLP_OUTPUT_NAMES}, "
            f"or a fused experts parameter '{FUSED_EXPERT_OUTPUT_NAME}')"
        )
    return writers


def _post_norm(layer: nn.Module, name: str, norm_name: str, hidden_size: int) -> tuple[nn.Module, str]:
    norm = getattr(layer, norm_name)
    weight = getattr(norm, "weight", None)
    if (
        not isinstance(weight, nn.Parameter)
        or tuple(weight.shape) != (hidden_size,)
        or getattr(norm, "bias", None) is not None
    ):
        raise StructureError(
            f"{name}.{norm_name} ({type(norm).__name__}): a post-sublayer norm must be an RMS norm with a "
            f"[{hidden_size}] weight and no bias"
        )
    return norm, f"{name}.{norm_name}.weight"


def _describe_layer(index: int, name: str, layer: nn.Module, hidden_size: int) -> LayerStructure:
    attention_name, attention = _child(layer, ATTENTION_NAMES)
    mlp_name, mlp = _child(layer, MLP_NAMES)
    sandwich = all(isinstance(getattr(layer, n, None), nn.Module) for n in SANDWICH_NORM_NAMES)
    attention_norm = _post_norm(layer, name, ATTENTION_POST_NORM_NAME, hidden_size) if sandwich else None
    mlp_norm = _post_norm(layer, name, MLP_POST_NORM_NAME, hidden_size) if sandwich else None

    found = _child(attention, ATTENTION_OUTPUT_NAMES)
    if found is None:
        raise StructureError(
            f"{name}.{attention_name} ({type(attention).__name__}): found no output projection "
            f"(one of {ATTENTION_OUTPUT_NAMES})"
        )
    output_name, output = found
    writers = _projection_writers(
        output, f"{name}.{attention_name}.{output_name}", hidden_size, index, ATTENTION, attention_norm
    )
    writers += _mlp_writers(mlp, f"{name}.{mlp_name}", hidden_size, index, mlp_norm)
    return LayerStructure(
        index=index,
        name=name,
        layer=layer,
        attention=attention,
        mlp=mlp,
        attention_post_norm=attention_norm[0] if attention_norm else None,
        mlp_post_norm=mlp_norm[0] if mlp_norm else None,
        writers=tuple(writers),
    )


def describe_model(model: nn.Module) -> ModelStructure:
    """Find the decoder layers, their residual sites and every residual writer of a causal LM.

    Raises:
        StructureError (a ValueError): naming the module that could not be classified.
    """
    token_embedding = model.get_input_embeddings()
    if not isinstance(token_embedding, nn.Embedding):
        raise StructureError(f"{type(model).__name__}.get_input_embeddings() is not an nn.Embedding")
    hidden_size = token_embedding.embedding_dim
    list_name, layer_list = _find_layer_list(model)
    layers = tuple(_describe_layer(i, f"{list_name}.{i}", layer, hidden_size) for i, layer in enumerate(layer_list))
    # Other residual embeddings (learned positions) live outside the layers, next to the token embedding.
    embeddings = []
    for name, module in model.named_modules():
        if name.startswith(f"{list_name}.") or not isinstance(module, nn.Embedding):
            continue
        if module is token_embedding or module.embedding_dim == hidden_size:
            embeddings.append(ResidualWriter(f"{name}.weight", module.weight, ROWS, None, EMBEDDING))
    return ModelStructure(hidden_size, list_name, layers, tuple(embeddings), token_embedding)


def per_expert_checkpoint_key(structure: ModelStructure) -> re.Pattern[str]:
    """Matches checkpoint keys of experts stored one nn.Linear each ("...layers.3.mlp.experts.7.down_proj.weight").

    transformers may fuse such experts into one 3-D parameter when it loads them, so these keys
    are not in the model's state dict; group 1 is the layer index. Each is a MATRIX writer.
    """
    mlp, out = "|".join(MLP_NAMES), "|".join(MLP_OUTPUT_NAMES)
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
    if not isinstance(direction, torch.Tensor):
        raise TypeError(f"direction must be a torch.Tensor, got {type(direction).__name__}")
    if not direction.dtype.is_floating_point:
        raise TypeError(f"direction must have a floating-point dtype, got {direction.dtype}")
    num_layers, d_model = len(structure.layers), structure.hidden_size
    if direction.shape not in ((d_model,), (num_layers, d_model)):
        raise ValueError(
            f"direction must have shape [{d_model}] or [num_layers={num_layers}, {d_model}], got {tuple(direction.shape)}"
        )
    norms = direction.detach().float().reshape(-1, d_model).norm(dim=-1)
    if not bool((torch.isfinite(norms) & (norms > 0)).all()):
        raise ValueError("direction must be finite and non-zero (in every row)")
    if layers is None:
        selected = list(range(num_layers))
    else:
        selected = [int(i) for i in layers]
        bad = [i for i in selected if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers holds {bad}, outside [0, {num_layers})")
    result = {}
    for i in selected:
        row = direction if direction.dim() == 1 else direction[i]
        target = device if device is not None else execution_device(structure.layers[i].layer)
        result[i] = row.detach().to(device=target, dtype=torch.float32).contiguous()
    return result
