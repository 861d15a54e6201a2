"""Orthogonalize quantized weights in place, without a full-precision copy.

W <- W - scale * d (d^T W) on the quantized storage of a residual-stream writer: the fused
kernels dequantize on the fly, accumulate c = d^T W in fp32, then requantize each group with
a fresh scale (and zero) chosen from its updated values. One module per format documents
its layout and holds the pure-torch reference (dequantize -> orthogonalize -> requantize):

  int8   bitsandbytes Int8Params (CB, SCB) and torchao Int8Tensor (qdata, scale), per row
  gptq   int4 group-wise asymmetric, GPTQ layout (qweight [in/8, out]; zeros stored minus 1
         in v1, as is in v2, `zeros_format`)
  awq    int4 group-wise asymmetric, AWQ GEMM layout (qweight [in, out/8], order 0 2 4 6 1 3 5 7)
  fp8    float8_e4m3fn with per-tensor, per-row or 128x128 block scales (also torchao's
         Float8Tensor, whose scale multiplies as weight_scale_inv does)
  nf4    bitsandbytes Params4bit NF4, with or without double quantization

Fused MoE experts [E, out, in] (`find_quantized_experts`: transformers' FP8Experts, torchao
tensors of 3 dims) are edited one expert at a time, in place on each expert's slice, after
every expert has been checked.

Editing weights or ablating activations: on a quantized model the edit is a one-time cost,
after which inference runs as before, but the edited weight is requantized, so d^T W is zero
only up to the format's quantization noise (|d^T W_deq|_j <= sum_i |d_i| * step_ij / 2).
The alternative is a forward hook that applies `refusal_kernels.ablate_` to each writer's
output: exact for any format (the output is a dense activation) and the weights stay
untouched, at the price of one ablation per token and layer at inference time.
"""

from . import awq, fp8, gptq, int8, nf4
from .recognize import QuantizedWeight, find_quantized_experts, find_quantized_weight, orthogonalize_quantized_

__all__ = [
    "QuantizedWeight",
    "awq",
    "find_quantized_experts",
    "find_quantized_weight",
    "fp8",
    "gptq",
    "int8",
    "nf4",
    "orthogonalize_quantized_",
]
