"""One entry per quantized layout, used by the quantized-op tests: how to quantize a dense
weight, run the fused kernel or the pure-torch reference in place, dequantize, and bound
the rounding error of every element (half a quantization step, from the stored scales).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from refusal_kernels.quant import awq, fp8, gptq, int8, nf4

OUT, IN = 40, 96  # out is not a multiple of 128 (fp8 blocks); 3 groups of 32 (odd count)
GROUP = 32


def clone_state(state):
    if isinstance(state, nf4.NF4Weight):
        return state._replace(**{k: v.clone() for k, v in state._asdict().items() if isinstance(v, torch.Tensor)})
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in state)


def tensors(state) -> list[torch.Tensor]:
    return [t for t in state if isinstance(t, torch.Tensor)]


def int4_half_step(scales: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return scales.float()[group].T / 2


def fp8_half_step(state) -> torch.Tensor:
    weight, weight_scale = state
    magnitude = weight.float().abs()
    exponent = torch.floor(torch.log2(magnitude.clamp(min=2.0**-6)))
    spacing = torch.exp2(exponent - 3)
    return spacing / 2 * fp8.dequantize(torch.ones_like(weight.float()).to(torch.float8_e4m3fn), weight_scale)


def nf4_half_step(q: nf4.NF4Weight, shape: tuple[int, int] = (OUT, IN)) -> torch.Tensor:
    levels = q.code
    gaps = levels.diff()
    around = torch.maximum(torch.cat([gaps[:1], gaps]), torch.cat([gaps, gaps[-1:]]))
    block = torch.arange(shape[0] * shape[1]) // q.blocksize
    return (around[nf4.unpack(q.packed)] / 2 * nf4.block_absmax(q)[block]).reshape(shape)


@dataclass(frozen=True)
class Format:
    quantize: Callable  # dense [OUT, IN] -> state
    kernel_: Callable  # (state, direction, scale)
    reference_: Callable
    dequantize: Callable  # state -> fp32 [OUT, IN]
    half_step: Callable  # state -> fp32 [OUT, IN], the largest rounding error of each element


def _gptq_format(act_order: bool, zeros_format: str = "v1") -> Format:
    g_idx = (torch.arange(IN) * 7 % IN // GROUP).int() if act_order else None
    return Format(
        quantize=lambda w: (*gptq.quantize(w, GROUP, g_idx, zeros_format=zeros_format), g_idx),
        kernel_=lambda s, d, c=1.0: gptq.orthogonalize_(*s, d, GROUP, c, zeros_format),
        reference_=lambda s, d, c=1.0: gptq.orthogonalize_reference_(*s, d, GROUP, c, zeros_format),
        dequantize=lambda s: gptq.dequantize(*s, GROUP, zeros_format),
        half_step=lambda s: int4_half_step(s[2], gptq.group_of_column(IN, GROUP, g_idx)),
    )


def _fp8_format(scale_shape: tuple[int, ...], block: tuple[int, int]) -> Format:
    def quantize(w):
        weight, weight_scale = fp8.quantize(w, block)
        return weight, weight_scale.reshape(scale_shape)

    return Format(
        quantize=quantize,
        kernel_=lambda s, d, c=1.0: fp8.orthogonalize_(*s, d, c),
        reference_=lambda s, d, c=1.0: fp8.orthogonalize_reference_(*s, d, c),
        dequantize=lambda s: fp8.dequantize(*s),
        half_step=fp8_half_step,
    )


def _int8_format(absmax_scale: bool) -> Format:
    return Format(
        quantize=lambda w: int8.quantize(w, absmax_scale),
        kernel_=lambda s, d, c=1.0: int8.orthogonalize_(*s, d, c, absmax_scale),
        reference_=lambda s, d, c=1.0: int8.orthogonalize_reference_(*s, d, c, absmax_scale),
        dequantize=lambda s: int8.dequantize(*s, absmax_scale),
        half_step=lambda s: int8.dequantize(torch.ones(OUT, IN), s[1], absmax_scale) / 2,
    )


def _nf4_format(double_quant: bool) -> Format:
    return Format(
        quantize=lambda w: nf4.quantize(w, 64, double_quant, nested_blocksize=8),
        kernel_=lambda s, d, c=1.0: nf4.orthogonalize_(s, d, c),
        reference_=lambda s, d, c=1.0: nf4.orthogonalize_reference_(s, d, c),
        dequantize=lambda s: nf4.dequantize(s, (OUT, IN)),
        half_step=nf4_half_step,
    )


FORMATS = {
    "int8 torchao": _int8_format(False),
    "int8 bitsandbytes": _int8_format(True),
    "gptq": _gptq_format(False),
    "gptq act-order": _gptq_format(True),
    "gptq v2": _gptq_format(False, "v2"),
    "gptq v2 act-order": _gptq_format(True, "v2"),
    "awq": Format(
        quantize=lambda w: awq.quantize(w, GROUP),
        kernel_=lambda s, d, c=1.0: awq.orthogonalize_(*s, d, GROUP, c),
        reference_=lambda s, d, c=1.0: awq.orthogonalize_reference_(*s, d, GROUP, c),
        dequantize=lambda s: awq.dequantize(*s, GROUP),
        half_step=lambda s: int4_half_step(s[2], torch.arange(IN) // GROUP),
    ),
    "fp8 tensor": _fp8_format((), (OUT, IN)),
    "fp8 row": _fp8_format((OUT, 1), (1, IN)),
    # One 128 x 128 block covers 40 x 96: its [1, 1] scale reads as per tensor (torchao's shape).
    # Several blocks: test_quant_recognize.py (torchao, transformers) and test_backends_triton_quant.py.
    "fp8 block": _fp8_format((1, 1), (128, 128)),
    "nf4": _nf4_format(False),
    "nf4 double-quant": _nf4_format(True),
}


def weight_with_component(
    direction: torch.Tensor, strength: float = 30.0, seed: int = 0, in_features: int = IN
) -> torch.Tensor:
    """A random [OUT, in_features] weight plus a strong component along direction, so that removing it matters."""
    generator = torch.Generator().manual_seed(seed)
    unit = direction / direction.norm()
    noise = torch.randn(OUT, in_features, generator=generator)
    return noise + strength * unit[:, None] * torch.randn(in_features, generator=generator)
