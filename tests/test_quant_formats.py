"""Quantized orthogonalize: packing, kernels against the pure-torch references, the residual
along the direction within quantization noise, a tiny model's logits, and the hooks alternative."""

from __future__ import annotations

import pytest
import torch
from quant_cases import FORMATS, IN, OUT, clone_state, tensors, weight_with_component

import refusal_kernels as rk
from refusal_kernels import reference
from refusal_kernels.quant import _common, awq, gptq, nf4


def direction(seed: int = 1) -> torch.Tensor:
    return torch.randn(OUT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FORMATS)
def test_requantizing_dequantized_weight_is_exact(name):
    fmt = FORMATS[name]
    state = fmt.quantize(weight_with_component(direction()))
    again = fmt.quantize(fmt.dequantize(state))
    if name == "nf4 double-quant":
        # Rounding each absmax up to a nested level moves the mean (the nested offset), so
        # the levels shift slightly: within one step, not bit-exact.
        assert ((fmt.dequantize(again) - fmt.dequantize(state)).abs() <= 2 * fmt.half_step(state)).all()
    else:
        assert torch.equal(fmt.dequantize(again), fmt.dequantize(state))


@pytest.mark.parametrize(
    "pack, unpack, shape",
    [
        (gptq.pack, gptq.unpack, (OUT, IN)),
        (awq.pack, awq.unpack, (OUT, IN)),
        (lambda z: gptq.pack_zeros(z + 1), lambda q: gptq.unpack_zeros(q) - 1, (3, OUT)),
        (lambda z: gptq.pack_zeros(z, "v2"), lambda q: gptq.unpack_zeros(q, "v2"), (3, OUT)),
        (awq.pack_zeros, awq.unpack_zeros, (3, OUT)),
        (nf4.pack, nf4.unpack, (OUT * IN,)),
    ],
    ids=["gptq", "awq", "gptq zeros", "gptq v2 zeros", "awq zeros", "nf4"],
)
def test_packing_round_trips(pack, unpack, shape):
    values = torch.randint(0, 16, shape)
    assert torch.equal(unpack(pack(values)).long(), values)


def test_gptq_zeros_formats_store_the_same_zero_one_apart():
    zeros = torch.randint(1, 16, (3, OUT))  # in both formats' range
    v1, v2 = gptq.pack_zeros(zeros, "v1"), gptq.pack_zeros(zeros, "v2")
    assert torch.equal(gptq.unpack_zeros(v2, "v2") - gptq.unpack_zeros(v1, "v2"), torch.ones_like(zeros))
    # GPTQModel converts v1 to v2 by adding 1 to every nibble of each word: 0x11111111.
    assert torch.equal(v2, v1 + 0x11111111)


def test_packed_bit_order():
    values = torch.arange(8).repeat(IN // 8)  # input (GPTQ) or output (AWQ) k holds value k
    assert gptq.pack(values[None, :].expand(8, -1))[0, 0] == 0x76543210
    assert awq.pack(values[:8, None].expand(-1, 8))[0, 0] == 0x75316420
    assert nf4.pack(torch.tensor([0x3, 0xA])).item() == 0x3A


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("name", FORMATS)
def test_kernel_matches_reference(name, scale):
    fmt = FORMATS[name]
    d = direction()
    state = fmt.quantize(weight_with_component(d))
    expected = clone_state(state)
    fmt.kernel_(state, d, scale)
    fmt.reference_(expected, d, scale)
    # fp32 summation order may move a value across a rounding boundary: one step at most.
    actual_w, expected_w = fmt.dequantize(state), fmt.dequantize(expected)
    step = 2 * torch.maximum(fmt.half_step(state), fmt.half_step(expected))
    assert ((actual_w - expected_w).abs() <= step * 1.001 + 1e-6).all()
    flipped = (actual_w - expected_w).abs() > 0.01 * step  # not just a scale one ulp apart
    assert flipped.float().mean() < 0.01


@pytest.mark.parametrize("name", FORMATS)
def test_component_along_direction_within_quantization_noise(name):
    fmt = FORMATS[name]
    d = direction()
    unit = d / d.norm()
    state = fmt.quantize(weight_with_component(d))
    before = unit @ fmt.dequantize(state)
    fmt.kernel_(state, d)
    residual = unit @ fmt.dequantize(state)
    # W' = W - d d^T W has d^T W' = 0; each stored value is W' plus a rounding error of at
    # most half a step, so |d^T W_deq|_j <= sum_i |d_i| * half_step_ij.
    bound = unit.abs() @ fmt.half_step(state)
    assert (residual.abs() <= bound * 1.001 + 1e-5).all()
    assert bound.norm() < 0.25 * before.norm(), "the bound says nothing: the quantization is too coarse"


class TinyModel(torch.nn.Module):
    """Two MLP blocks whose down projections write into a residual stream, then an unembedding."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.up = [torch.randn(IN, OUT, generator=g) / OUT**0.5 for _ in range(2)]
        self.down = [weight_with_component(direction(), seed=seed + k) / IN**0.5 for k in range(2)]
        self.unembed = torch.randn(50, OUT, generator=g) / OUT**0.5

    def logits(self, h: torch.Tensor, down: list[torch.Tensor]) -> torch.Tensor:
        for up, w in zip(self.up, down, strict=True):
            h = h + torch.nn.functional.gelu(h @ up.T) @ w.T
        return h @ self.unembed.T


@pytest.mark.parametrize("name", FORMATS)
def test_tiny_model_logits_within_quantization_error(name):
    fmt = FORMATS[name]
    model = TinyModel()
    d = direction()
    h = torch.randn(16, OUT, generator=torch.Generator().manual_seed(2))
    quantized = [fmt.quantize(w) for w in model.down]

    exact = model.logits(h, [reference.orthogonalize(w, d) for w in model.down])
    orthogonalize_then_quantize = model.logits(
        h, [fmt.dequantize(fmt.quantize(reference.orthogonalize(w, d))) for w in model.down]
    )
    for state in quantized:
        fmt.kernel_(state, d)
    in_place = model.logits(h, [fmt.dequantize(state) for state in quantized])
    plain_error = (
        model.logits(h, [fmt.dequantize(fmt.quantize(w)) for w in model.down]) - model.logits(h, model.down)
    ).norm()

    # The in-place edit carries the shipped rounding through and adds a second, finer one
    # (the orthogonalized weight has a smaller range): the result must stay within the
    # format's own quantization error on this model.
    assert (in_place - orthogonalize_then_quantize).norm() <= plain_error
    assert (in_place - exact).norm() <= plain_error


class DequantizingLinear(torch.nn.Module):
    def __init__(self, fmt, state):
        super().__init__()
        self.fmt, self.state = fmt, state

    def forward(self, x):
        return x @ self.fmt.dequantize(self.state).T


@pytest.mark.parametrize("name", FORMATS)
def test_output_hook_ablation_is_exact_for_any_format(name):
    fmt = FORMATS[name]
    d = direction()
    module = DequantizingLinear(fmt, fmt.quantize(weight_with_component(d)))
    x = torch.randn(8, IN)
    plain = module(x)
    handle = module.register_forward_hook(lambda _module, _inputs, output: rk.ablate_(output, d))
    hooked = module(x)
    handle.remove()
    torch.testing.assert_close(hooked, reference.ablate(plain, d), rtol=1e-5, atol=1e-4)
    assert (hooked @ (d / d.norm())).abs().max() < 1e-4 * plain.abs().max()


def test_int4_scale_covers_the_group_without_clamping():
    low = torch.tensor([-3.0, 0.0, -1e-3, 0.0, -2.0])
    high = torch.tensor([5.0, 7.0, 4.0, 0.0, 0.0])
    for zero_min in (0, 1):
        scale, zero = _common.asymmetric_int4_scale_zero(low, high, zero_min, torch.float16)
        assert ((zero >= zero_min) & (zero <= zero_min + 15)).all()
        assert (-zero * scale.float() <= low).all() and ((15 - zero) * scale.float() >= high).all()


def test_stored_tensors_are_written_in_place():
    fmt = FORMATS["gptq act-order"]
    d = direction()
    state = fmt.quantize(weight_with_component(d))
    pointers = [t.data_ptr() for t in tensors(state)]
    fmt.kernel_(state, d)
    assert [t.data_ptr() for t in tensors(state)] == pointers


# Every quantized op, traced whole: its fake kernel must take the schema's defaults.
@pytest.mark.parametrize("name", ["int8 torchao", "gptq act-order", "awq", "fp8 block", "nf4", "nf4 double-quant"])
def test_every_quantized_op_inside_torch_compile_fullgraph(name):
    fmt = FORMATS[name]
    d = torch.randn(OUT, generator=torch.Generator().manual_seed(4))
    expected = fmt.quantize(weight_with_component(d))
    state = clone_state(expected)
    fmt.kernel_(expected, d)
    torch._dynamo.reset()
    torch.compile(fmt.kernel_, fullgraph=True, backend="aot_eager")(state, d)
    assert all(torch.equal(a, b) for a, b in zip(tensors(state), tensors(expected), strict=True))
