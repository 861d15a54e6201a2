"""The low-bit K-quant GGUF references Q2_K and Q3_K: what is particular to them.

Here: their sizes, a round trip through a GGUF file written and read by gguf-py, and the fused
kernel (refusal::orthogonalize_q2_k, _q3_k) against the reference. Their dequantize, quantize and edit tests are shared with Q4_K, Q5_K and Q6_K, parametrized over all
five types, in tests/test_quant_gguf_kquants.py (cases in tests/kquant_cases.py); what those
check against what, for these two:
  * dequantize against gguf-py's `gguf.quants.dequantize` (a numpy port of llama.cpp's
    dequantize_row_q2_K and dequantize_row_q3_K), bit for bit, on quantized and on random
    blocks; the grids of the bounds are read from the bytes with numpy, following
    gguf-py's unpacking.
  * quantize: llama.cpp itself is not available here, so these tests check properties only:
    every value lands on the nearest level of its sub-block's stored grid, the RMS error of
    each format stays below a bound, and awkward rows stay finite (zero rows exactly zero).
    The byte-for-byte comparison with llama.cpp's quantize_row_q2_K_ref and
    quantize_row_q3_K_ref (transcribed with their helpers from ggml/src/ggml-quants.c,
    compiled with gcc on x86-64 at -O0 and -O2, no FMA contraction) was made when the module
    was written, on random super-blocks (normal, with outliers, zero, constant, with zero or
    tiny sub-blocks, one-signed, sparse, heavy-tailed, scaled by 1e-4 and 1e3), and is not
    repeated here.
"""

import gguf
import numpy as np
import pytest
import torch
from kquant_cases import normal

from refusal_kernels.quant.gguf import kquants_low

TYPES = sorted(kquants_low.FORMATS)


def test_formats():
    assert kquants_low.FORMATS == {"Q2_K": (256, 84), "Q3_K": (256, 110)}
    for name, sizes in kquants_low.FORMATS.items():
        assert sizes == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


@pytest.mark.parametrize("type_name", TYPES)
def test_gguf_reader_round_trip(type_name, tmp_path):
    """Blocks written into a GGUF file by gguf-py read back as the same bytes and the same values."""
    values = normal(8, 512, seed=1)
    blocks = kquants_low.quantize(values, type_name)
    quant_type = gguf.GGMLQuantizationType[type_name]
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "test")
    writer.add_tensor("weight", blocks.numpy(), raw_shape=tuple(blocks.shape), raw_dtype=quant_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(str(path)).tensors
    assert tensor.tensor_type == quant_type
    raw = torch.from_numpy(np.array(tensor.data)).reshape(blocks.shape)
    assert torch.equal(raw, blocks)
    restored = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(np.array(tensor.data), quant_type)))
    assert torch.equal(restored.reshape(values.shape), kquants_low.dequantize(blocks, type_name))
