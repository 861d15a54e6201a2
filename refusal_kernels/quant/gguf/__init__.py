"""GGUF block formats: the layouts of llama.cpp's quantized tensors, and pure-torch references.

One module per family of formats, each with the layout of its blocks, `dequantize` (blocks
to fp32), `quantize` (fp32 to blocks, following llama.cpp's reference quantizer for that type)
and `orthogonalize_reference_` (dequantize, orthogonalize in fp32, requantize every block with
fresh scales, written back into the same bytes):

  legacy    Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 values per block)
  kquants   Q4_K, Q5_K, Q6_K (256 values per super-block)
"""

from ._blocks import LAYOUTS

__all__ = ["LAYOUTS"]
