"""Orthogonalize quantized weights in place, without a full-precision copy.

W <- W - scale * d (d^T W) on the quantized storage of a residual-stream writer: the fused
kernels dequantize on the fly, accumulate c = d^T W in fp32, then requantize each group with
a fresh scale (and zero) chosen from its updated values. One module per format documents
its layout and holds the pure-torch reference (dequantize -> orthogonalize -> requantize):

  int8   bitsandbytes Int8Params (CB, SCB) and torchao Int8Tensor (qdata, scale), per row
  gptq   int4 group-wise asymmetric, GPTQ layout (qweight [in/8, out], zeros stored minus 1)
  awq    int4 group-wise asymmetric, AWQ GEMM layout (qweight [in, out/8], order 0 2 4 6 1 3 5 7)
  fp8    float8_e4m3fn with per-tensor, per-row or 128x128 block scales
  nf4    bitsandbytes Params4bit NF4, with or without double quantization

Editing weights or ablating activations: on a quantized model the edit is a one-time cost,
after which inference runs as before, but the edited weight is requantized, so d^T W is zero
only up to the format's quantization noise (|d^T W_deq|_j <= sum_i |d_i| * step_ij / 2).
The alternative is a forward hook that applies `refusal_kernels.ablate_` to each writer's
output: exact for any format (the output is a dense activation) and the weights stay
untouched, at the price of one ablation per token and layer at inference time.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

import torch

from . import awq, fp8, gptq, int8, nf4

__all__ = ["awq", "fp8", "gptq", "int8", "nf4", "orthogonalize_quantized_"]

_FP8_SCALE_NAMES = ("weight_scale_inv", "weight_scale")


def _attr(obj, name):
    return getattr(obj, name, None)


def _bitsandbytes_int8(module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(CB, SCB) of a Linear8bitLt: on the weight before the first forward, on module.state after it."""
    weight, state = _attr(module, "weight"), _attr(module, "state")
    for holder in (weight, state):
        cb, scb = _attr(holder, "CB"), _attr(holder, "SCB")
        if isinstance(cb, torch.Tensor) and isinstance(scb, torch.Tensor):
            return cb, scb
    return None


def _bitsandbytes_nf4(module) -> nf4.NF4Weight | None:
    weight = _attr(module, "weight")
    state = _attr(weight, "quant_state")
    if state is None:
        return None
    quant_type = _attr(state, "quant_type")
    if quant_type not in (None, "nf4", "fp4"):
        raise TypeError(f"unsupported bitsandbytes 4-bit quant_type {quant_type!r}")
    nested = {}
    if _attr(state, "nested"):
        nested = {
            "nested_absmax": state.state2.absmax,
            "nested_offset": state.offset,
            "nested_code": state.state2.code,
            "nested_blocksize": state.state2.blocksize,
        }
    return nf4.NF4Weight(weight.data, state.absmax, state.code, state.blocksize, **nested)


def _is_awq(target, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """AWQ packs along out (qweight [in, out/8]), GPTQ along in (qweight [in/8, out]); scales is [groups, out]."""
    hint = f"{_attr(target, 'quant_method') or ''} {type(target).__name__}".lower()
    out_features = scales.shape[-1]
    by_shape = qweight.shape[1] * 8 == out_features and qweight.shape[1] != out_features
    if "awq" in hint or "gptq" in hint:
        return "awq" in hint
    return by_shape


def orthogonalize_quantized_(module_or_tensors, direction: torch.Tensor, scale: float = 1.0):
    """W <- W - scale * d (d^T W) on a quantized residual-stream writer, in place.

    Args:
        module_or_tensors: one of (recognized by attributes, so that the quantization
            libraries need not be installed here):
              * bitsandbytes Linear8bitLt (weight.CB / weight.SCB, or state.CB / state.SCB)
              * bitsandbytes Linear4bit (weight.quant_state; NF4 or FP4, nested or not)
              * a module or mapping with qweight, qzeros, scales (and optional g_idx):
                GPTQ or AWQ, told apart by a `quant_method` attribute or class name when
                present, else by the packed shapes
              * a torchao int8 tensor (qdata int8 [N, K], scale [N, 1]), or a module whose
                weight is one
              * an fp8 module or mapping: weight float8_e4m3fn with weight_scale_inv or
                weight_scale
        direction: [d_model] (the weight's out_features), any float dtype.
        scale: 1 removes the component, as in `refusal_kernels.orthogonalize_`.

    Returns:
        module_or_tensors, for chaining.

    Raises:
        TypeError: nothing recognizable as a supported quantized weight.
    """
    target = module_or_tensors
    if isinstance(target, Mapping):
        target = SimpleNamespace(**target)
    weight = target if isinstance(target, torch.Tensor) else _attr(target, "weight")

    if isinstance(_attr(weight, "qdata"), torch.Tensor) and isinstance(_attr(weight, "scale"), torch.Tensor):
        if weight.qdata.dtype != torch.int8:
            raise TypeError(f"only int8 torchao tensors are supported, got qdata of dtype {weight.qdata.dtype}")
        int8.orthogonalize_(weight.qdata, weight.scale, direction, scale)
    elif (int8_storage := _bitsandbytes_int8(target)) is not None:
        int8.orthogonalize_(*int8_storage, direction, scale, absmax_scale=True)
    elif (nf4_weight := _bitsandbytes_nf4(target)) is not None:
        nf4.orthogonalize_(nf4_weight, direction, scale)
    elif all(isinstance(_attr(target, name), torch.Tensor) for name in ("qweight", "qzeros", "scales")):
        qweight, qzeros, scales = target.qweight, target.qzeros, target.scales
        if _is_awq(target, qweight, scales):
            awq.orthogonalize_(qweight, qzeros, scales, direction, qweight.shape[0] // scales.shape[0], scale)
        else:
            group_size = 8 * qweight.shape[0] // scales.shape[0]
            gptq.orthogonalize_(qweight, qzeros, scales, _attr(target, "g_idx"), direction, group_size, scale)
    elif isinstance(weight, torch.Tensor) and weight.dtype == torch.float8_e4m3fn:
        weight_scale = next((s for name in _FP8_SCALE_NAMES if (s := _attr(target, name)) is not None), None)
        if weight_scale is None:
            raise TypeError(f"fp8 weight without any of {_FP8_SCALE_NAMES}")
        fp8.orthogonalize_(weight, weight_scale, direction, scale)
    else:
        raise TypeError(
            f"{type(module_or_tensors).__name__} is not a recognized quantized weight: expected bitsandbytes "
            "Linear8bitLt/Linear4bit, GPTQ/AWQ qweight/qzeros/scales, a torchao int8 tensor, or an fp8 weight "
            "with weight_scale(_inv)"
        )
    return module_or_tensors
