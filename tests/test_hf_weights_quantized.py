"""orthogonalize_model_ and patch on tiny models whose o_proj/down_proj hold quantized weights.

bitsandbytes (LLM.int8, NF4, double-quantized NF4, on its CPU backend) and torchao (int8 and
float8 weight-only) layers are built by the libraries themselves. GPTQ (v1, and GPTQModel's
v2 zeros), AWQ and fp8 have no CPU library, so their modules are built here with the
project's packers (refusal_kernels.quant), which follow the published layouts; their forward
reads the packed tensors with the transcriptions of AutoGPTQ's and AutoAWQ's dequantization in
test_quant_recognize.py.

The yardstick for the in-place edit is the format's own quantization error: the quantized
model's logits differ from the fp32 model's by some amount q. The in-place result is compared
with the fp32 model orthogonalized first and quantized afterwards. Both are orth(W) plus
rounding: the reference rounds once, the in-place edit carries the original rounding
(projected) plus one requantization, so they differ by at most three roundings of one format,
3 q to first order.

Along r the in-place edit leaves what its requantization rounds. Each element of the stored
weight is within half a quantization step of orth(W), so every write y = W x has
|r.y| <= sum_j |x_j| sum_i |r_i| step_ij / 2, checked on every write of every token. That
worst case is loose at 4 bits, so the residual stream's component along r is also compared
with the reference model's, which is pure rounding noise (orth(W) has none). The in-place
leftover is not independent noise (a shift of less than half a step rounds back to the old
level, in the old component's direction); measured, it is up to 2.1 times the reference's.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from quant_cases import fp8_half_step, int4_half_step, nf4_half_step
from test_hf_families import tiny_direction, tiny_model
from test_hf_hooks import _forward, _max_relative_projection, _relative_difference, _residual_states
from test_quant_recognize import (
    autoawq_dequantize,
    autogptq_dequantize,
    stored_bytes,
    torchao_float8_half_step,
    torchao_float8_layer,
    transformers_fp8_experts,
)
from torch import nn

from refusal_kernels import reference
from refusal_kernels.hf import orthogonalize_model_, patch
from refusal_kernels.quant import awq, fp8, gptq, int8, nf4

GROUP = 32
WRITER_NAMES = ("o_proj", "down_proj")
# Three roundings against one, see the module docstring.
ROUNDINGS_BOUND = 3.0
# The in-place component along r against the reference's rounding noise: measured up to 2.1.
NOISE_BOUND = 3.0


def _import_or_skip(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(name)


class GPTQLinear(nn.Module):
    """A GPTQ QuantLinear (checkpoint format v1): qweight [in / 8, out], qzeros, scales, g_idx."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, 4
        g_idx = (torch.arange(linear.in_features) // GROUP).int()
        quantized = gptq.quantize(linear.weight, GROUP, g_idx, zeros_format=self.zeros_format())
        for name, t in zip(("qweight", "qzeros", "scales", "g_idx"), (*quantized, g_idx), strict=True):
            self.register_buffer(name, t)

    @staticmethod
    def zeros_format() -> str:
        return "v1"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero_offset = 1 if self.zeros_format() == "v1" else 0
        return x @ autogptq_dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, zero_offset=zero_offset)


class GPTQModelV2Linear(GPTQLinear):
    """A GPTQModel QuantLinear holding v2 qzeros (the zero itself), as its qzero_format() says."""

    @staticmethod
    def zeros_format() -> str:
        return "v2"

    def qzero_format(self) -> int:
        return 2


class AWQLinear(nn.Module):
    """An AutoAWQ WQLinear_GEMM: qweight [in, out / 8] in the order 0 2 4 6 1 3 5 7."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.w_bit = linear.in_features, linear.out_features, 4
        for name, t in zip(("qweight", "qzeros", "scales"), awq.quantize(linear.weight, GROUP), strict=True):
            self.register_buffer(name, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ autoawq_dequantize(self.qweight, self.qzeros, self.scales, GROUP)


class FP8Linear(nn.Module):
    """An fp8 e4m3 linear with a dequantization scale `weight_scale_inv` of one block shape."""

    def __init__(self, linear: nn.Linear, block: tuple[int, int]) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, weight_scale = fp8.quantize(linear.weight, block)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(weight_scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ fp8.dequantize(self.weight, self.weight_scale_inv).T


def _bitsandbytes_int8(linear: nn.Linear) -> nn.Module:
    bnb = _import_or_skip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")  # quantizes


def _bitsandbytes_nf4(double_quant: bool):
    def build(linear: nn.Linear) -> nn.Module:
        bnb = _import_or_skip("bitsandbytes")
        options = {"quant_type": "nf4", "compress_statistics": double_quant}
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, **options)
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, blocksize=64, **options)
        return layer.to("cpu")  # quantizes

    return build


def _torchao_int8(linear: nn.Linear) -> nn.Module:
    _import_or_skip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(linear, Int8WeightOnlyConfig())
    return linear


def _torchao_float8(granularity: str):
    def build(linear: nn.Linear) -> nn.Module:
        _import_or_skip("torchao")
        return torchao_float8_layer(granularity, linear.weight.detach())

    return build


def _bitsandbytes_int8_half_step(layer: nn.Module) -> torch.Tensor:
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return int8.dequantize(torch.ones(layer.out_features, layer.in_features), scb, absmax_scale=True) / 2


def _bitsandbytes_nf4_half_step(layer: nn.Module) -> torch.Tensor:
    state = layer.weight.quant_state
    nested = (state.state2.absmax, state.offset, state.state2.code, state.state2.blocksize) if state.nested else ()
    q = nf4.NF4Weight(layer.weight.data, state.absmax, state.code, state.blocksize, *nested)
    return nf4_half_step(q, (layer.out_features, layer.in_features))


def _torchao_int8_half_step(layer: nn.Module) -> torch.Tensor:
    return int8.dequantize(torch.ones(layer.out_features, layer.in_features), layer.weight.scale) / 2


class Case(NamedTuple):
    format: str  # what orthogonalize_model_ records
    build: Callable[[nn.Linear], nn.Module]  # a quantized module from a float nn.Linear
    half_step: Callable[[nn.Module], torch.Tensor]  # the largest rounding error of each element, [out, in]


CASES = {
    "bitsandbytes-int8": Case("bitsandbytes-int8", _bitsandbytes_int8, _bitsandbytes_int8_half_step),
    "bitsandbytes-nf4": Case("bitsandbytes-nf4", _bitsandbytes_nf4(False), _bitsandbytes_nf4_half_step),
    "bitsandbytes-nf4-double-quant": Case("bitsandbytes-nf4", _bitsandbytes_nf4(True), _bitsandbytes_nf4_half_step),
    "torchao-int8": Case("torchao-int8", _torchao_int8, _torchao_int8_half_step),
    "torchao-fp8-row": Case("torchao-fp8", _torchao_float8("row"), lambda m: torchao_float8_half_step(m.weight)),
    "torchao-fp8-tensor": Case("torchao-fp8", _torchao_float8("tensor"), lambda m: torchao_float8_half_step(m.weight)),
    "gptq": Case("gptq", GPTQLinear, lambda m: int4_half_step(m.scales, m.g_idx.long())),
    "gptq-v2": Case("gptq", GPTQModelV2Linear, lambda m: int4_half_step(m.scales, m.g_idx.long())),
    "awq": Case("awq", AWQLinear, lambda m: int4_half_step(m.scales, torch.arange(m.in_features) // GROUP)),
    "fp8-row": Case(
        "fp8",
        lambda linear: FP8Linear(linear, (1, linear.in_features)),
        lambda m: fp8_half_step((m.weight, m.weight_scale_inv)),
    ),
    "fp8-block": Case(
        "fp8", lambda linear: FP8Linear(linear, (128, 128)), lambda m: fp8_half_step((m.weight, m.weight_scale_inv))
    ),
}


def _quantize_writers(model: nn.Module, build) -> nn.Module:
    """A copy of `model` whose o_proj and down_proj are replaced by build(linear)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if name.endswith(WRITER_NAMES):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, build(module))
    return model


def _writers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith(WRITER_NAMES)}


def _largest_write_along_r_in_rounding_bounds(model: nn.Module, direction: torch.Tensor, half_step) -> float:
    """max over writers and tokens of |r.y| / (|x| @ (half_step^T |r|)): at most 1 if every
    stored element is within half a step of a weight with no component along r."""
    unit = reference.unit(direction)
    ratios: list[float] = []

    def measure(module, args, output):
        bound = args[0].abs() @ (half_step(module).T @ unit.abs())
        ratios.append(float(((output @ unit).abs() / bound).max()))

    handles = [m.register_forward_hook(measure) for m in _writers(model).values()]
    try:
        _forward(model)
    finally:
        for h in handles:
            h.remove()
    return max(ratios)


def _relative_projection_norm(model: nn.Module, direction: torch.Tensor) -> float:
    """|component of every residual state along r| / |every residual state|, all states together."""
    states = torch.cat([s.float().reshape(-1, s.shape[-1]) for s in _residual_states(model)])
    return float((states @ reference.unit(direction)).norm() / states.norm())


def _assert_close_to_the_quantized_reference(
    label, quantized, reference_model, direction, quantization_error, projection_before, note=""
):
    """The model edited in place against `reference_model` (orthogonalized in fp32, then quantized):
    logits within ROUNDINGS_BOUND times the format's own quantization error, and the residual along
    r within NOISE_BOUND times the reference's rounding noise."""
    gap = _relative_difference(_forward(quantized), _forward(reference_model))
    projection_after = _relative_projection_norm(quantized, direction)
    noise = _relative_projection_norm(reference_model, direction)
    print(
        f"{label}: logit gap {gap:.2e}, quantization error {quantization_error:.2e} "
        f"(ratio {gap / quantization_error:.2f}); {note}residual along r {projection_before:.3f} -> "
        f"{projection_after:.4f} (rounding noise {noise:.4f})"
    )
    assert 0 < gap <= ROUNDINGS_BOUND * quantization_error
    assert projection_after <= NOISE_BOUND * noise < projection_before


@pytest.fixture(scope="module")
def base():
    model = tiny_model("llama")
    return model, tiny_direction(model)


@pytest.mark.parametrize("fmt", CASES)
def test_in_place_edit_is_within_the_formats_quantization_error(base, fmt):
    model, direction = base
    case = CASES[fmt]
    quantized = _quantize_writers(model, case.build)
    reference_model = copy.deepcopy(model)
    orthogonalize_model_(reference_model, direction)
    reference_model = _quantize_writers(reference_model, case.build)

    quantization_error = _relative_difference(_forward(quantized), _forward(model))
    projection_before = _relative_projection_norm(quantized, direction)
    record = orthogonalize_model_(quantized, direction)

    formats = {c.name: c.format for c in record.changed}
    written = {name: fmt for name, fmt in formats.items() if name.rsplit(".", 2)[-2] in WRITER_NAMES}
    assert len(written) == 4 and set(written.values()) == {case.format}
    assert formats["model.embed_tokens.weight"] is None  # the embedding stays on the float path
    along_r = _largest_write_along_r_in_rounding_bounds(quantized, direction, case.half_step)
    _assert_close_to_the_quantized_reference(
        fmt,
        quantized,
        reference_model,
        direction,
        quantization_error,
        projection_before,
        f"largest write along r {along_r:.2f} of its rounding bound; ",
    )
    assert along_r <= 1.0


@pytest.mark.parametrize("fmt", CASES)
def test_hooks_mode_is_exact_on_quantized_weights(base, fmt):
    model, direction = base
    quantized = _quantize_writers(model, CASES[fmt].build)
    before = stored_bytes(quantized)
    assert _max_relative_projection(_residual_states(quantized), direction) > 1e-2
    with patch(quantized, direction, mode="hooks"):
        assert _max_relative_projection(_residual_states(quantized), direction) < 2e-5
    after = stored_bytes(quantized)
    assert all(torch.equal(after[name], t) for name, t in before.items())


@pytest.mark.parametrize("fmt", ["gptq", "bitsandbytes-nf4-double-quant", "fp8-block"])
def test_weights_mode_restores_quantized_storage_bit_for_bit(base, fmt):
    model, direction = base
    quantized = _quantize_writers(model, CASES[fmt].build)
    before, logits = stored_bytes(quantized), _forward(quantized)
    with patch(quantized, direction, mode="weights"):
        assert not torch.equal(_forward(quantized), logits)
    after = stored_bytes(quantized)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], t) for name, t in before.items())
    assert torch.equal(_forward(quantized), logits)


class AWQMarkedLinear(GPTQLinear):
    """Named like an AWQ module, but packed like GPTQ."""


def _corrupt(module: GPTQLinear, how: str) -> nn.Module:
    if how == "scales for another group count":
        module.scales = module.scales[:-1].clone()
    elif how == "qzeros of another width":
        module.qzeros = torch.cat([module.qzeros, module.qzeros[:, :1]], dim=1)
    elif how == "g_idx out of range":
        module.g_idx = torch.full_like(module.g_idx, module.scales.shape[0])
    elif how == "declared in_features":
        module.in_features += 8
    elif how == "marked AWQ":
        module.__class__ = AWQMarkedLinear
    return module


BAD_LAYOUTS = {
    "scales for another group count": "does not split in_features = 128 into equal groups",
    "qzeros of another width": "qzeros must have shape",
    "g_idx out of range": "g_idx holds groups",
    "declared in_features": "in_features is 136",
    "marked AWQ": "is marked AWQ, but qweight shape (16, 64) is GPTQ packing",
}


@pytest.mark.parametrize("how", BAD_LAYOUTS)
def test_inconsistent_layout_raises_naming_the_module_and_changes_nothing(base, how):
    model, direction = base
    quantized = _quantize_writers(model, GPTQLinear)
    # The last writer, so that a check made while writing would come after every other edit.
    _corrupt(quantized.model.layers[1].mlp.down_proj, how)
    before = stored_bytes(quantized)
    with pytest.raises(ValueError, match=re.escape("model.layers.1.mlp.down_proj")) as error:
        orthogonalize_model_(quantized, direction)
    assert BAD_LAYOUTS[how] in str(error.value)
    after = stored_bytes(quantized)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], t) for name, t in before.items())


# ---- Quantized fused experts [E, d_model, d_ff] (Qwen2-MoE, Mixtral).


def _torchao_float8_experts(granularity: str = "row"):
    """torchao's quantize_ on the experts' 3-D down_proj parameter (FqnToConfig), weight-only float8.

    (torchao makes 3-D Int8Tensors too, but transformers' experts forward needs a transpose
    that Int8Tensor does not implement; test_quant_recognize.py edits one on its own.)
    """

    def build(experts: nn.Module, config) -> nn.Module:
        _import_or_skip("torchao")
        from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig, PerRow, PerTensor, quantize_

        quant_config = Float8WeightOnlyConfig(granularity={"row": PerRow(), "tensor": PerTensor()}[granularity])
        quantize_(experts, FqnToConfig({"down_proj": quant_config}), filter_fn=None)
        return experts

    return build


def _experts_half_step(experts: nn.Module) -> torch.Tensor:
    """[E, out, in]: the largest rounding error of each element of each expert."""
    weight = experts.down_proj
    if hasattr(weight, "qdata"):
        stored, scales = weight.qdata, weight.scale
    else:
        stored, scales = weight, experts.down_proj_scale_inv
    return torch.stack([fp8_half_step((q, s)) for q, s in zip(stored, scales, strict=True)])


def _experts_dequantized(experts: nn.Module) -> torch.Tensor:
    weight = experts.down_proj
    if hasattr(weight, "qdata"):
        return weight.dequantize().float()
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    return _dequantize_fp8_weight(weight, experts.down_proj_scale_inv, experts.block_size, torch.float32)


EXPERT_CASES = {
    "transformers-fp8": ("fp8", transformers_fp8_experts),
    "torchao-fp8-row": ("torchao-fp8", _torchao_float8_experts()),
}
MOE_FAMILIES = ("qwen2_moe", "mixtral")


def _quantize_experts(model: nn.Module, build) -> nn.Module:
    """A copy of `model` whose fused experts are replaced by build(experts, config)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if name.endswith(".mlp.experts"):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, build(module, model.config))
    return model


def _fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith(".mlp.experts")}


@pytest.mark.parametrize("fmt", EXPERT_CASES)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_quantized_fused_experts_are_edited_in_place(family, fmt):
    expected_format, build = EXPERT_CASES[fmt]
    model = tiny_model(family)
    direction = tiny_direction(model)
    unit = reference.unit(direction)
    quantized = _quantize_experts(model, build)
    reference_model = copy.deepcopy(model)
    orthogonalize_model_(reference_model, direction)
    reference_model = _quantize_experts(reference_model, build)
    storage = {name: [t.data_ptr() for t in _state_tensors(m)] for name, m in _fused_experts(quantized).items()}

    quantization_error = _relative_difference(_forward(quantized), _forward(model))
    projection_before = _relative_projection_norm(quantized, direction)
    record = orthogonalize_model_(quantized, direction)

    experts = _fused_experts(quantized)
    changed = {c.name: c for c in record.changed if c.name.endswith(".mlp.experts.down_proj")}
    assert changed.keys() == {f"{name}.down_proj" for name in experts}
    assert {c.format for c in changed.values()} == {expected_format}
    for name, module in experts.items():
        assert changed[f"{name}.down_proj"].shape == tuple(module.down_proj.shape)
        assert [t.data_ptr() for t in _state_tensors(module)] == storage[name]  # in place
        # Each expert is within half a step of a weight with no component along r.
        along_r = torch.einsum("i,eij->ej", unit, _experts_dequantized(module)).abs()
        assert (along_r <= torch.einsum("i,eij->ej", unit.abs(), _experts_half_step(module)) * 1.001 + 1e-5).all()
    _assert_close_to_the_quantized_reference(
        f"{family} {fmt}", quantized, reference_model, direction, quantization_error, projection_before
    )


def _state_tensors(module: nn.Module) -> list[torch.Tensor]:
    weight = module.down_proj
    return [weight.qdata, weight.scale] if hasattr(weight, "qdata") else [weight, module.down_proj_scale_inv]


def _wrong_block_scale(model: nn.Module) -> None:
    experts = model.model.layers[1].mlp.experts
    experts.down_proj_scale_inv = nn.Parameter(experts.down_proj_scale_inv.repeat(1, 2, 1), requires_grad=False)


BAD_EXPERTS = {
    # (build, corrupt the last layer's experts, error, message)
    "fp8 scale of no granularity": (
        transformers_fp8_experts,
        _wrong_block_scale,
        ValueError,
        "model.layers.1.mlp.experts.down_proj (fp8): expert 0: weight_scale shape (2, 1)",
    ),
    "torchao one scale for all experts": (
        _torchao_float8_experts("tensor"),
        lambda model: None,
        TypeError,
        "model.layers.0.mlp.experts (Qwen2MoeExperts): down_proj shares one scale among its 4 experts",
    ),
}


@pytest.mark.parametrize("case", BAD_EXPERTS)
def test_unsupported_quantized_experts_raise_naming_the_module_and_change_nothing(case):
    build, corrupt, error, message = BAD_EXPERTS[case]
    model = tiny_model("qwen2_moe")
    quantized = _quantize_experts(model, build)
    corrupt(quantized)
    before = stored_bytes(quantized)
    with pytest.raises(error, match=re.escape(message)):
        orthogonalize_model_(quantized, tiny_direction(model))
    after = stored_bytes(quantized)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], t) for name, t in before.items())


@pytest.mark.parametrize("fmt", EXPERT_CASES)
def test_patch_on_quantized_experts_restores_storage_and_hooks_are_exact(fmt):
    model = tiny_model("qwen2_moe")
    direction = tiny_direction(model)
    quantized = _quantize_experts(model, EXPERT_CASES[fmt][1])
    before, logits = stored_bytes(quantized), _forward(quantized)
    with patch(quantized, direction, mode="weights"):
        assert not torch.equal(_forward(quantized), logits)
    with patch(quantized, direction, mode="hooks"):
        assert _max_relative_projection(_residual_states(quantized), direction) < 2e-5
    after = stored_bytes(quantized)
    assert all(torch.equal(after[name], t) for name, t in before.items())
    assert torch.equal(_forward(quantized), logits)
