"""Small synthetic GGUF files for the GGUF tests: a model of a chosen llama.cpp architecture whose
residual writers are stored in a chosen GGML type, written with the `gguf` package's writer.

Every architecture is the llama layout (tensor names as llama.cpp's loaders read them) plus
what its loader adds: q/k/v biases (qwen2, qwen2moe), per-head q/k norms (qwen3, qwen3moe,
gemma3), routed experts in place of the MLP (qwen2moe, qwen3moe) with a gated shared expert
(qwen2moe), and norms after each sublayer (gemma2, gemma3). Norm weights are stored as the gain
llama.cpp multiplies by (for Gemma that is its 1 + w, as llama.cpp's converter writes it).
"""

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
HEAD_DIM = D_MODEL // HEADS
N_EXPERTS = 4
EXPERTS_USED = 2
D_FF_EXPERT = 512  # a row length the K-quants take, and not d_model, so the experts' axes are told apart

QKV_BIAS = ("qwen2", "qwen2moe")
QK_NORM = ("qwen3", "qwen3moe", "gemma3")
MOE = ("qwen2moe", "qwen3moe")
SHARED_EXPERT = ("qwen2moe",)
POST_NORMS = ("gemma2", "gemma3")


def _encoded(values: torch.Tensor, type_: gguf.GGMLQuantizationType) -> np.ndarray:
    """values [..., ne0] as the bytes [..., bytes_per_row] of `type_` (our encoders; llama.cpp's reference quantizers)."""
    rows = values.reshape(-1, values.shape[-1])
    if type_ in DENSE_TYPES:
        data = rows.to(DENSE_TYPES[type_]).view(torch.uint8).numpy()
    else:
        data = blocks.quantize(rows, type_.name).numpy()
    return data.reshape(*values.shape[:-1], -1)


def tensors(
    n_layers: int, writer_type: str, tied: bool, seed: int = 0, vocab: int = VOCAB, arch: str = "llama"
) -> dict[str, tuple[torch.Tensor, str]]:
    """name -> (fp32 values in numpy order [..., ne0], GGML type name) of a model of `arch`."""
    generator = torch.Generator().manual_seed(seed)

    def values(*shape: int, std: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def gain(size: int = D_MODEL) -> tuple[torch.Tensor, str]:
        return 1 + values(size, std=0.3), "F32"

    made = {"token_embd.weight": (values(vocab, D_MODEL, std=1.0), writer_type)}
    for i in range(n_layers):
        block = {
            "attn_norm.weight": gain(),
            "attn_q.weight": (values(D_MODEL, D_MODEL), "F32"),
            "attn_k.weight": (values(D_MODEL, D_MODEL), "F32"),
            "attn_v.weight": (values(D_MODEL, D_MODEL), "F32"),
            "attn_output.weight": (values(D_MODEL, D_MODEL), writer_type),
            "ffn_norm.weight": gain(),
        }
        if arch in QKV_BIAS:
            block |= {f"attn_{x}.bias": (values(D_MODEL), "F32") for x in "qkv"}
        if arch in QK_NORM:
            block |= {"attn_q_norm.weight": gain(HEAD_DIM), "attn_k_norm.weight": gain(HEAD_DIM)}
        if arch in POST_NORMS:
            block |= {"post_attention_norm.weight": gain(), "post_ffw_norm.weight": gain()}
        block |= _experts(arch, values, writer_type) if arch in MOE else _mlp(values, writer_type)
        made |= {f"blk.{i}.{name}": tensor for name, tensor in block.items()}
    made["output_norm.weight"] = gain()
    if not tied:
        made["output.weight"] = (values(vocab, D_MODEL), "F32")
    return made


def _mlp(values, writer_type: str, suffix: str = "") -> dict[str, tuple[torch.Tensor, str]]:
    return {
        f"ffn_gate{suffix}.weight": (values(D_FF, D_MODEL), "F32"),
        f"ffn_up{suffix}.weight": (values(D_FF, D_MODEL), "F32"),
        f"ffn_down{suffix}.weight": (values(D_MODEL, D_FF), writer_type),
    }


def _experts(arch: str, values, writer_type: str) -> dict[str, tuple[torch.Tensor, str]]:
    """A router, the experts stacked on the outer axis (ggml's ne = (ne0, ne1, n_expert)) and the shared expert."""
    made = {
        "ffn_gate_inp.weight": (values(N_EXPERTS, D_MODEL), "F32"),
        "ffn_gate_exps.weight": (values(N_EXPERTS, D_FF_EXPERT, D_MODEL), "F32"),
        "ffn_up_exps.weight": (values(N_EXPERTS, D_FF_EXPERT, D_MODEL), "F32"),
        "ffn_down_exps.weight": (values(N_EXPERTS, D_MODEL, D_FF_EXPERT), writer_type),
    }
    if arch in SHARED_EXPERT:
        made |= {"ffn_gate_inp_shexp.weight": (values(D_MODEL), "F32"), **_mlp(values, writer_type, "_shexp")}
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
    """A GGUF of `arch` at `path` whose residual writers are `writer_type`; returns the path.
    llama.cpp loads it too: its tokenizer model is "none", a model with no vocabulary."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(n_layers)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(D_FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_context_length(128)
    writer.add_sliding_window(128)  # gemma3's llama.cpp loader needs one; the whole context here
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    if arch in MOE:
        writer.add_expert_count(N_EXPERTS)
        writer.add_expert_used_count(EXPERTS_USED)
        writer.add_expert_feed_forward_length(D_FF_EXPERT)
    if arch in SHARED_EXPERT:
        writer.add_expert_shared_feed_forward_length(D_FF)
    writer.add_tokenizer_model("none")
    writer.add_string("test.note", "kept as is")
    for name, (values, type_name) in tensors(n_layers, writer_type, tied, vocab=vocab, arch=arch).items():
        type_ = gguf.GGMLQuantizationType[type_name]
        writer.add_tensor(name, _encoded(values, type_), raw_dtype=type_)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
