"""Small synthetic GGUF files for the GGUF tests: a llama-shaped model whose residual writers
are stored in a chosen GGML type, written with the `gguf` package's writer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from refusal_kernels.hf.gguf import DENSE_TYPES
from refusal_kernels.quant import gguf as blocks

D_MODEL = 256  # a whole K-quant super-block per row
D_FF = 512
VOCAB = 48
HEADS = 4


def _encoded(values: torch.Tensor, type_: gguf.GGMLQuantizationType) -> np.ndarray:
    """values [rows, ne0] as the bytes of `type_` (our encoders; llama.cpp's reference quantizers)."""
    if type_ in DENSE_TYPES:
        return values.to(DENSE_TYPES[type_]).view(torch.uint8).numpy()
    return blocks.quantize(values, type_.name).numpy()


def tensors(
    n_layers: int, writer_type: str, tied: bool, seed: int = 0, vocab: int = VOCAB
) -> dict[str, tuple[torch.Tensor, str]]:
    """name -> (fp32 values [rows, ne0], GGML type name) of a llama-shaped model."""
    generator = torch.Generator().manual_seed(seed)

    def values(rows: int, cols: int, std: float = 0.05) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) * std

    made = {"token_embd.weight": (values(vocab, D_MODEL, 1.0), writer_type)}
    for i in range(n_layers):
        made |= {
            f"blk.{i}.attn_norm.weight": (1 + values(1, D_MODEL, 0.1), "F32"),
            f"blk.{i}.attn_q.weight": (values(D_MODEL, D_MODEL), "F32"),
            f"blk.{i}.attn_k.weight": (values(D_MODEL, D_MODEL), "F32"),
            f"blk.{i}.attn_v.weight": (values(D_MODEL, D_MODEL), "F32"),
            f"blk.{i}.attn_output.weight": (values(D_MODEL, D_MODEL), writer_type),
            f"blk.{i}.ffn_norm.weight": (1 + values(1, D_MODEL, 0.1), "F32"),
            f"blk.{i}.ffn_gate.weight": (values(D_FF, D_MODEL), "F32"),
            f"blk.{i}.ffn_up.weight": (values(D_FF, D_MODEL), "F32"),
            f"blk.{i}.ffn_down.weight": (values(D_MODEL, D_FF), writer_type),
        }
    made["output_norm.weight"] = (1 + values(1, D_MODEL, 0.1), "F32")
    if not tied:
        made["output.weight"] = (values(vocab, D_MODEL), "F32")
    return made


def write(
    path: Path,
    *,
    writer_type: str = "Q8_0",
    n_layers: int = 2,
    tied: bool = True,
    arch: str = "llama",
    vocab: int = VOCAB,
) -> Path:
    """A llama-shaped GGUF at `path` whose residual writers are `writer_type`; returns the path."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(n_layers)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(D_FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_context_length(128)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_string("test.note", "kept as is")
    for name, (values, type_name) in tensors(n_layers, writer_type, tied, vocab=vocab).items():
        type_ = gguf.GGMLQuantizationType[type_name]
        data = _encoded(values, type_)
        # The bytes [rows, bytes_per_row] give the shape; norms are 1-D.
        writer.add_tensor(name, data.reshape(-1) if name.endswith("norm.weight") else data, raw_dtype=type_)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
