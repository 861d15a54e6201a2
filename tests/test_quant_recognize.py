"""Quantized orthogonalize on the layouts of real quantization libraries.

bitsandbytes (NF4, double-quantized NF4, LLM.int8) and torchao (int8 weight-only, float8
per tensor, per row and per 128x128 block) run when installed: the layers are built by the
library, and the result is read back with the library's own dequantize and forward. (The NF4 layer has in_features = 128: bitsandbytes'
native CPU dequantize disagrees with its own generic implementation, which we follow, when
blocks of 64 straddle rows.) GPTQ and AWQ have no CPU-installable library, so
their layouts are checked against transcriptions of the published dequantization code
(AutoGPTQ's `QuantLinear` unpacking, AutoAWQ's `dequantize_gemm`).
"""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from quant_cases import GROUP, IN, OUT, fp8_half_step, nf4_half_step, weight_with_component
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from refusal_kernels import reference
from refusal_kernels.quant import (
    awq,
    find_quantized_experts,
    fp8,
    gptq,
    int8,
    nf4,
    orthogonalize_quantized_,
)

D = torch.randn(OUT, generator=torch.Generator().manual_seed(1))
UNIT = D / D.norm()
NF4_IN = 128


def import_or_skip(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(name)


def assert_residual_within(w_deq: torch.Tensor, half_step: torch.Tensor) -> None:
    assert ((UNIT @ w_deq).abs() <= UNIT.abs() @ half_step * 1.001 + 1e-5).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_nf4(double_quant):
    bnb = import_or_skip("bitsandbytes")
    functional = bnb.functional
    shape = (OUT, NF4_IN)
    layer = bnb.nn.Linear4bit(NF4_IN, OUT, bias=False, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(
        weight_with_component(D, in_features=NF4_IN),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=double_quant,
        blocksize=64,
    )
    layer = layer.to("cpu")
    state = layer.weight.quant_state
    assert torch.equal(state.code, nf4.NF4_CODE)
    if double_quant:
        assert torch.equal(state.state2.code, nf4.dynamic_code())

    def ours():
        return nf4.NF4Weight(
            layer.weight.data,
            state.absmax,
            state.code,
            state.blocksize,
            *((state.state2.absmax, state.offset, state.state2.code, state.state2.blocksize) if double_quant else ()),
        )

    assert torch.equal(nf4.dequantize(ours(), shape), functional.dequantize_4bit(layer.weight.data, state))
    orthogonalize_quantized_(layer, D)
    library_w = functional.dequantize_4bit(layer.weight.data, state)
    assert torch.equal(nf4.dequantize(ours(), shape), library_w)
    assert_residual_within(library_w, nf4_half_step(ours(), shape))
    x = torch.randn(4, NF4_IN)
    torch.testing.assert_close(layer(x), x @ library_w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("forward_first", [False, True])
def test_bitsandbytes_int8(forward_first):
    bnb = import_or_skip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(IN, OUT, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight_with_component(D), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    x = torch.randn(4, IN)
    if forward_first:  # moves CB and SCB from the weight to layer.state
        layer(x)
    orthogonalize_quantized_(layer, D)
    cb, scb = (layer.state.CB, layer.state.SCB) if forward_first else (layer.weight.CB, layer.weight.SCB)
    library_w = bnb.functional.int8_vectorwise_dequant(cb, scb).float()
    torch.testing.assert_close(library_w, int8.dequantize(cb, scb, absmax_scale=True))
    assert_residual_within(library_w, int8.dequantize(torch.ones(OUT, IN), scb, absmax_scale=True) / 2)
    # The layer's own int8 forward quantizes x too: compare loosely, but along d it must be ~0.
    y = layer(x).float()
    torch.testing.assert_close(y, x @ library_w.T, rtol=0.05, atol=0.05 * y.abs().max().item())


def test_torchao_int8_weight_only():
    import_or_skip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight_with_component(D))
    quantize_(model, Int8WeightOnlyConfig())
    weight = model[0].weight
    orthogonalize_quantized_(model[0], D)
    library_w = weight.dequantize().float()
    torch.testing.assert_close(library_w, int8.dequantize(weight.qdata, weight.scale))
    assert_residual_within(library_w, int8.dequantize(torch.ones(OUT, IN), weight.scale) / 2)
    x = torch.randn(4, IN)
    torch.testing.assert_close(model(x), x @ library_w.T, rtol=1e-4, atol=1e-4)


def _torchao_float8_granularity(name: str):
    from torchao.quantization import PerRow, PerTensor
    from torchao.quantization.granularity import PerBlock

    return {"tensor": PerTensor(), "row": PerRow(), "block": PerBlock([128, 128])}[name]


def torchao_float8_layer(granularity: str, weight: torch.Tensor) -> torch.nn.Linear:
    """An nn.Linear whose weight torchao quantized to a Float8Tensor of this granularity, on the CPU.

    torchao's quantize_ builds per-tensor and per-row weights here (Float8WeightOnlyConfig);
    its 128x128 blocks are only reachable through Float8DynamicActivationFloat8WeightConfig,
    which refuses a CPU, so that one is built with torchao's own Float8Tensor.from_hp.
    """
    from torchao.quantization import Float8Tensor, Float8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    if granularity == "block":
        quantized = Float8Tensor.from_hp(weight, granularity=_torchao_float8_granularity(granularity))
        layer.weight = torch.nn.Parameter(quantized, requires_grad=False)
    else:
        quantize_(layer, Float8WeightOnlyConfig(granularity=_torchao_float8_granularity(granularity)))
    return layer


def torchao_float8_half_step(weight) -> torch.Tensor:
    return fp8_half_step((weight.qdata, weight.scale))


@pytest.mark.parametrize("granularity, shape", [("tensor", (OUT, IN)), ("row", (OUT, IN)), ("block", (256, 384))])
def test_torchao_float8(granularity, shape):
    import_or_skip("torchao")
    from torchao.quantization import Float8Tensor

    direction = torch.randn(shape[0], generator=torch.Generator().manual_seed(2))
    unit = direction / direction.norm()
    generator = torch.Generator().manual_seed(3)
    dense = torch.randn(shape, generator=generator) + 30 * unit[:, None] * torch.randn(shape[1], generator=generator)
    layer = torchao_float8_layer(granularity, dense)
    weight = layer.weight
    assert isinstance(weight, Float8Tensor) and weight.qdata.dtype == torch.float8_e4m3fn
    expected_scale_shape = {"tensor": (1, 1), "row": (shape[0], 1), "block": (shape[0] // 128, shape[1] // 128)}
    assert tuple(weight.scale.shape) == expected_scale_shape[granularity]
    before = weight.dequantize().float()
    # torchao's scale multiplies, W = qdata * scale, as the fp8 layout's weight_scale does.
    torch.testing.assert_close(before, fp8.dequantize(weight.qdata, weight.scale), rtol=0, atol=0)
    # The reference: orthogonalize in fp32, then quantize with torchao's own quantizer.
    orthogonal = Float8Tensor.from_hp(
        reference.orthogonalize(before, direction), granularity=_torchao_float8_granularity(granularity)
    )

    orthogonalize_quantized_(layer, direction)
    assert layer.weight is weight
    library_w = weight.dequantize().float()
    half_step = torchao_float8_half_step(weight)
    assert ((unit @ library_w).abs() <= unit.abs() @ half_step * 1.001 + 1e-5).all()
    assert (unit.abs() @ half_step).norm() < 0.25 * (unit @ before).norm()
    # As test_kernel_matches_reference: one step at most (fp32 summation order), and rarely.
    step = 2 * torch.maximum(half_step, torchao_float8_half_step(orthogonal))
    gap = (library_w - orthogonal.dequantize().float()).abs()
    assert (gap <= step * 1.001 + 1e-6).all()
    assert (gap > 0.01 * step).float().mean() < 0.01
    x = torch.randn(4, shape[1])
    torch.testing.assert_close(layer(x), x @ library_w.T, rtol=1e-4, atol=1e-4)


def test_torchao_float8_per_group_scales_raise_and_leave_storage():
    """torchao's PerGroup(128) (one scale per 1 x 128) is a granularity the fp8 op has no kernel for."""
    import_or_skip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig, PerGroup, quantize_

    layer = torch.nn.Linear(256, OUT, bias=False)
    quantize_(layer, Float8WeightOnlyConfig(granularity=PerGroup(128)))
    qdata, scale = layer.weight.qdata.clone(), layer.weight.scale.clone()
    with pytest.raises(ValueError, match="weight_scale"):
        orthogonalize_quantized_(layer, D)
    assert torch.equal(layer.weight.qdata.view(torch.uint8), qdata.view(torch.uint8))
    assert torch.equal(layer.weight.scale, scale)


def _fp8_experts_class():
    from transformers.integrations.finegrained_fp8 import FP8Experts, _dequantize_fp8_weight

    class CPUFP8Experts(FP8Experts):
        """transformers' FP8Experts, whose fused fp8 matmul is a GPU Triton kernel: here its fp8
        weights are read with transformers' own _dequantize_fp8_weight instead."""

        def linear(self, input, weight, weight_scale_inv, activation_scale=None):
            if weight.element_size() > 1:
                return nn.functional.linear(input, weight)
            return nn.functional.linear(
                input, _dequantize_fp8_weight(weight, weight_scale_inv, self.block_size, input.dtype)
            )

    return CPUFP8Experts


def transformers_fp8_experts(experts: nn.Module, config, block_size: tuple[int, int] | None = None) -> nn.Module:
    """FP8Experts holding `experts`' down_proj as transformers' FineGrainedFP8 quantizer stores it
    (Fp8Quantize: fp8 [E, out, in], down_proj_scale_inv [E, ceil(out / b0), ceil(in / b1)], or
    [E, 1, 1] without blocks); gate_up_proj stays dense, which FP8Experts.linear multiplies as is."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    quantizer = SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block_size))
    stored = Fp8Quantize(quantizer)._quantize_one("down_proj", experts.down_proj.detach())
    module = _fp8_experts_class()(config, block_size=block_size)
    module.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach().clone(), requires_grad=False)
    module.down_proj.data.copy_(stored["down_proj"])
    module.down_proj_scale_inv.data.copy_(stored["down_proj_scale_inv"])
    return module


class Experts(torch.nn.Module):
    """Fused experts as transformers stores them: down_proj [E, out, in]."""

    def __init__(self, down_proj: torch.Tensor):
        super().__init__()
        self.down_proj = torch.nn.Parameter(down_proj, requires_grad=False)


def stored_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as raw bytes; a tensor subclass (torchao) by its inner tensors."""
    state = {}
    for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
        inner = (
            {f"{name}.{n}": getattr(t, n) for n in t.__tensor_flatten__()[0]}
            if is_traceable_wrapper_subclass(t)
            else {name: t}
        )
        state.update({k: v.detach().clone().reshape(-1).view(torch.uint8) for k, v in inner.items()})
    return state


def _experts_weight(count: int, out_features: int, in_features: int, direction: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    unit = direction / direction.norm()
    noise = torch.randn(count, out_features, in_features, generator=generator)
    return noise + 30 * unit[:, None] * torch.randn(count, 1, in_features, generator=generator)


def _assert_each_expert(dequantized, half_step, expected_dequantized, expected_half_step, unit) -> None:
    """Per expert: the component along unit within its rounding bound, and the reference's values
    within one step (fp32 summation order), rarely apart."""
    for w, h, e, eh in zip(dequantized, half_step, expected_dequantized, expected_half_step, strict=True):
        assert ((unit @ w).abs() <= unit.abs() @ h * 1.001 + 1e-5).all()
        step = 2 * torch.maximum(h, eh)
        assert ((w - e).abs() <= step * 1.001 + 1e-6).all()
        assert ((w - e).abs() > 0.01 * step).float().mean() < 0.01


def test_transformers_fp8_experts_with_128_blocks():
    """transformers' FP8Experts holding down_proj [2, 256, 384] in 128x128 blocks ([2, 2, 3] scales)."""
    from transformers import Qwen2MoeConfig
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    direction = torch.randn(256, generator=torch.Generator().manual_seed(2))
    config = Qwen2MoeConfig(hidden_size=256, moe_intermediate_size=384, num_experts=2)
    dense = Experts(_experts_weight(2, 256, 384, direction))
    dense.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 768, 256), requires_grad=False)
    experts = transformers_fp8_experts(dense, config, block_size=(128, 128))
    weight, weight_scale = experts.down_proj, experts.down_proj_scale_inv
    assert tuple(weight_scale.shape) == (2, 2, 3)
    expected = [(w.clone(), s.clone()) for w, s in zip(weight.data, weight_scale.data, strict=True)]
    for w, s in expected:
        fp8.orthogonalize_reference_(w, s, direction)

    quantized = find_quantized_experts(experts, out_features=256)
    assert (quantized.format, quantized.shape) == ("fp8", (2, 256, 384))
    quantized.orthogonalize_(direction)
    _assert_each_expert(
        _dequantize_fp8_weight(weight, weight_scale, experts.block_size, torch.float32),
        [fp8_half_step((w, s)) for w, s in zip(weight, weight_scale, strict=True)],
        [fp8.dequantize(w, s) for w, s in expected],
        [fp8_half_step(e) for e in expected],
        direction / direction.norm(),
    )


def test_torchao_int8_experts():
    """torchao's 3-D Int8Tensor (quantize_ with FqnToConfig on the experts' parameter)."""
    import_or_skip("torchao")
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, quantize_

    experts = Experts(_experts_weight(3, OUT, IN, D))
    quantize_(experts, FqnToConfig({"down_proj": Int8WeightOnlyConfig()}), filter_fn=None)
    weight = experts.down_proj
    assert tuple(weight.scale.shape) == (3, OUT, 1)
    expected = [(q.clone(), s.clone()) for q, s in zip(weight.qdata, weight.scale, strict=True)]
    for q, s in expected:
        int8.orthogonalize_reference_(q, s, D)

    quantized = find_quantized_experts(experts, out_features=OUT)
    assert (quantized.format, quantized.shape) == ("torchao-int8", (3, OUT, IN))
    quantized.orthogonalize_(D)
    _assert_each_expert(
        weight.dequantize().float(),
        [int8.dequantize(torch.ones(OUT, IN), s) / 2 for s in weight.scale],
        [int8.dequantize(q, s) for q, s in expected],
        [int8.dequantize(torch.ones(OUT, IN), s) / 2 for _, s in expected],
        UNIT,
    )


def _fbgemm_llama4_experts():
    from transformers import Llama4TextConfig
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Llama4TextExperts

    return FbgemmFp8Llama4TextExperts(Llama4TextConfig(hidden_size=OUT, intermediate_size=IN, num_local_experts=2))


def _gpt_oss_mxfp4_experts():
    from transformers import GptOssConfig
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts

    return Mxfp4GptOssExperts(GptOssConfig(hidden_size=OUT, intermediate_size=IN, num_local_experts=2))


def _torchao_float8_shared_scale_experts():
    import_or_skip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig, PerTensor, quantize_

    experts = Experts(_experts_weight(2, OUT, IN, D))
    quantize_(experts, FqnToConfig({"down_proj": Float8WeightOnlyConfig(granularity=PerTensor())}), filter_fn=None)
    return experts


UNSUPPORTED_EXPERTS = {
    # fp8 [E, in, out] with one scale per output column: the fp8 op scales rows of [out, in].
    "fbgemm fp8 Llama 4 (transposed)": (_fbgemm_llama4_experts, "quantized experts must be stored [E, out"),
    "gpt-oss MXFP4": (_gpt_oss_mxfp4_experts, "down_proj of dtype torch.uint8"),
    "torchao float8 per tensor (one scale for all experts)": (
        _torchao_float8_shared_scale_experts,
        "shares one scale among its 2 experts",
    ),
}


@pytest.mark.parametrize("case", UNSUPPORTED_EXPERTS)
def test_unsupported_quantized_experts_raise_type_error_and_leave_storage(case):
    build, message = UNSUPPORTED_EXPERTS[case]
    experts = build()
    before = stored_bytes(experts)
    with pytest.raises(TypeError, match=re.escape(message)):
        find_quantized_experts(experts, out_features=OUT)
    after = stored_bytes(experts)
    assert all(torch.equal(after[name], t) for name, t in before.items())


def autogptq_dequantize(qweight, qzeros, scales, g_idx, bits=4, zero_offset=1):
    """AutoGPTQ's unpacking (qlinear_cuda_old), transcribed: returns W^T [in, out].

    zero_offset=1 reads v1 qzeros (AutoGPTQ adds 1); GPTQModel's TorchQuantLinear reads its
    v2 qzeros the same way without the + 1 (zero_offset=0).
    """
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, 32 // bits), wf.unsqueeze(0))
    zeros = torch.bitwise_and(zeros.to(torch.int16), (2**bits) - 1) + zero_offset
    zeros = zeros.reshape(zeros.shape[0], -1)
    weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, 32 // bits, -1), wf.unsqueeze(-1))
    weight = torch.bitwise_and(weight.to(torch.int16), (2**bits) - 1)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    return scales.float()[g_idx.long()] * (weight - zeros[g_idx.long()]).float()


def autoawq_dequantize(qweight, qzeros, scales, group_size, bits=4):
    """AutoAWQ's dequantize_gemm (utils/packing_utils.py), transcribed: returns W^T [in, out]."""
    shifts = torch.arange(0, 32, bits)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    reverse_order = torch.arange(iweights.shape[-1], dtype=torch.int32).view(-1, 32 // bits)
    reverse_order = reverse_order[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    iweights = torch.bitwise_and(iweights[:, reverse_order], (2**bits) - 1)
    izeros = torch.bitwise_and(izeros[:, reverse_order], (2**bits) - 1)
    scales = scales.float().repeat_interleave(group_size, dim=0)
    izeros = izeros.repeat_interleave(group_size, dim=0)
    return (iweights - izeros).float() * scales


@pytest.mark.parametrize("zeros_format, zero_offset", [("v1", 1), ("v2", 0)])
def test_gptq_layout_matches_autogptq_and_gptqmodel(zeros_format, zero_offset):
    g_idx = (torch.arange(IN) * 5 % IN // GROUP).int()
    qweight, qzeros, scales = gptq.quantize(weight_with_component(D), GROUP, g_idx, zeros_format=zeros_format)
    for _ in range(2):  # as quantized, then orthogonalized
        torch.testing.assert_close(
            gptq.dequantize(qweight, qzeros, scales, g_idx, GROUP, zeros_format).T,
            autogptq_dequantize(qweight, qzeros, scales, g_idx, zero_offset=zero_offset),
            rtol=0,
            atol=0,
        )
        gptq.orthogonalize_(qweight, qzeros, scales, g_idx, D, GROUP, zeros_format=zeros_format)


def test_awq_layout_matches_autoawq():
    qweight, qzeros, scales = awq.quantize(weight_with_component(D), GROUP)
    awq.orthogonalize_(qweight, qzeros, scales, D, GROUP)
    torch.testing.assert_close(
        awq.dequantize(qweight, qzeros, scales, GROUP).T,
        autoawq_dequantize(qweight, qzeros, scales, GROUP),
        rtol=0,
        atol=0,
    )


class QuantLinear(torch.nn.Module):
    """Stands in for AutoGPTQ's QuantLinear (buffers only)."""

    def __init__(self, qweight, qzeros, scales, g_idx):
        super().__init__()
        for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
            self.register_buffer(name, t)


class WQLinear_GEMM(QuantLinear):
    pass


class GPTQModelQuantLinear(QuantLinear):
    """Stands in for GPTQModel's BaseQuantLinear, which records its qzeros format (1 or 2)."""

    def __init__(self, *tensors, qzeros_format: int):
        super().__init__(*tensors)
        self._qzeros_format = qzeros_format

    def qzero_format(self) -> int:
        return self._qzeros_format


class FP8Linear(torch.nn.Module):
    def __init__(self, weight, weight_scale_inv):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = torch.nn.Parameter(weight_scale_inv, requires_grad=False)


def _same_as_direct(build, direct_, read):
    """orthogonalize_quantized_ on build() gives bit-for-bit what direct_ gives."""
    via_dispatch, direct = build(), build()
    orthogonalize_quantized_(via_dispatch, D)
    direct_(direct)
    for a, b in zip(read(via_dispatch), read(direct), strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_recognizes_gptq_awq_fp8_and_mappings():
    w = weight_with_component(D)
    g_idx = (torch.arange(IN) // GROUP).int()
    _same_as_direct(
        lambda: QuantLinear(*gptq.quantize(w, GROUP, g_idx), g_idx),
        lambda m: gptq.orthogonalize_(m.qweight, m.qzeros, m.scales, m.g_idx, D, GROUP),
        lambda m: (m.qweight, m.qzeros, m.scales),
    )
    _same_as_direct(
        lambda: WQLinear_GEMM(*awq.quantize(w, GROUP), None),
        lambda m: awq.orthogonalize_(m.qweight, m.qzeros, m.scales, D, GROUP),
        lambda m: (m.qweight, m.qzeros, m.scales),
    )
    _same_as_direct(
        lambda: dict(zip(("qweight", "qzeros", "scales"), awq.quantize(w, GROUP), strict=True)),
        lambda m: awq.orthogonalize_(m["qweight"], m["qzeros"], m["scales"], D, GROUP),
        lambda m: (m["qweight"], m["qzeros"], m["scales"]),
    )
    _same_as_direct(
        lambda: FP8Linear(*fp8.quantize(w, (128, 128))),
        lambda m: fp8.orthogonalize_(m.weight.data, m.weight_scale_inv.data, D),
        lambda m: (m.weight.data, m.weight_scale_inv.data),
    )


def _gptq_mapping(tensors, checkpoint_format: str) -> dict:
    """qweight, qzeros and scales with GPTQModel's QuantizeConfig spelling of the format."""
    return {**dict(zip(("qweight", "qzeros", "scales"), tensors, strict=True)), "checkpoint_format": checkpoint_format}


@pytest.mark.parametrize(
    "build, zeros_format",
    [
        (lambda q, g_idx: GPTQModelQuantLinear(*q, g_idx, qzeros_format=2), "v2"),
        (lambda q, g_idx: GPTQModelQuantLinear(*q, g_idx, qzeros_format=1), "v1"),
        (lambda q, g_idx: _gptq_mapping(q, "gptq_v2"), "v2"),
        (lambda q, g_idx: _gptq_mapping(q, "gptq"), "v1"),
    ],
    ids=["qzero_format 2", "qzero_format 1", "checkpoint_format gptq_v2", "checkpoint_format gptq"],
)
def test_recognizes_gptq_zeros_format(build, zeros_format):
    w = weight_with_component(D)
    g_idx = (torch.arange(IN) // GROUP).int()

    def tensors(m):
        return tuple(m[k] if isinstance(m, dict) else getattr(m, k) for k in ("qweight", "qzeros", "scales"))

    _same_as_direct(
        lambda: build(gptq.quantize(w, GROUP, g_idx, zeros_format=zeros_format), g_idx),
        lambda m: gptq.orthogonalize_(*tensors(m), None, D, GROUP, zeros_format=zeros_format),
        tensors,
    )


@pytest.mark.parametrize(
    "module, named",
    [
        (lambda q: GPTQModelQuantLinear(*q, None, qzeros_format=3), "qzero_format"),
        (
            lambda q: _gptq_mapping(q, "gptq_v3"),
            "checkpoint_format",
        ),
    ],
    ids=["qzero_format 3", "checkpoint_format gptq_v3"],
)
def test_unknown_gptq_zeros_format_raises_and_leaves_storage(module, named):
    target = module(gptq.quantize(weight_with_component(D), GROUP))
    stored = dict(target) if isinstance(target, dict) else dict(target.named_buffers())
    before = {name: t.clone() for name, t in stored.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(ValueError, match=named):
        orthogonalize_quantized_(target, D)
    assert all(torch.equal(stored[name], t) for name, t in before.items())


def test_unrecognized_module_raises_type_error():
    with pytest.raises(TypeError, match="not a recognized quantized weight"):
        orthogonalize_quantized_(torch.nn.Linear(IN, OUT), D)
