"""Orthogonalize a sharded safetensors checkpoint too large to load, one tensor at a time.

Only safetensors are read or written; the output directory appears whole or not at all
(`saving.atomic_directory`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .. import ops
from . import families, weights
from .saving import atomic_directory

SAFETENSORS_INDEX = "model.safetensors.index.json"

SINGLE_SAFETENSORS = "model.safetensors"


def _write_safetensors(path: Path, entries: list[tuple[str, str, list[int], Any]], metadata: dict | None) -> int:
    """Write a safetensors file one tensor at a time: entries are (name, dtype tag, shape, load).

    `load()` returns the tensor's data only when it is written, so at most one tensor is in
    memory. Returns the number of data bytes written.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype_tag, shape, _ in entries:
        size = math.prod(shape) * _DTYPE_BYTES[dtype_tag]
        header[name] = {"dtype": dtype_tag, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name, _, _, load in entries:
            tensor = load().contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise RuntimeError(f"{name}: wrote {data.nbytes} bytes, the header says otherwise")
            file.write(memoryview(data))
            del tensor, data
    return offset


_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def _checkpoint_shards(src: Path) -> tuple[dict[str, str], dict | None]:
    """{tensor name: shard file name} and the index json (None for a single-file checkpoint)."""
    index_path = src / SAFETENSORS_INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        return dict(index["weight_map"]), index
    single = src / SINGLE_SAFETENSORS
    if not single.is_file():
        raise ValueError(f"src_dir {str(src)!r} has neither {SAFETENSORS_INDEX} nor {SINGLE_SAFETENSORS}")
    with safe_open(single, "pt") as file:
        return dict.fromkeys(file.keys(), SINGLE_SAFETENSORS), None


def orthogonalize_checkpoint(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    direction: torch.Tensor,
    *,
    scale: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """`orthogonalize_model_` + `save_pretrained` on a safetensors checkpoint, without loading it.

    Reads each shard memory-mapped and writes it back tensor by tensor, so the peak memory is
    about one tensor plus O(d_model) (writers are changed in their copy-on-write mapping, which
    allocates one tensor; the rest is read and written; the README gives the measured peak). The residual writers
    are found by `families.describe_model` on a meta-device skeleton built from config.json,
    so the tensors equal those of `orthogonalize_model_` on the loaded model. A head tied to
    the embeddings is untied: lm_head.weight is written with the original embedding and the
    config says tie_word_embeddings=false. Config, tokenizer and other files are copied; the
    shard index is updated.

    Args:
        src_dir: a transformers checkpoint directory (config.json, safetensors shards); not a
            quantized one (ValueError): load those and use `orthogonalize_model_`.
        dst_dir: the output directory; written atomically, as in `save_abliterated`.
        direction: [d_model] or [num_layers, d_model].
        scale: one number for every writer, as in `orthogonalize_model_` (not a Schedule).
        overwrite: replace a non-empty dst_dir.

    Returns:
        The resolved output directory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(src_dir).expanduser().resolve()
    if not (src / "config.json").is_file():
        raise ValueError(f"src_dir {str(src_dir)!r} is not a model directory (no config.json)")
    scale = families.check_scale(scale)
    config = AutoConfig.from_pretrained(src)
    # The skeleton is built dense, so packed keys (qweight, ...) would match no writer and be copied unedited.
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        raise ValueError(
            f"src_dir {str(src_dir)!r} is a quantized checkpoint (quant_method {method!r}), which cannot be streamed: "
            "load it and use orthogonalize_model_, or patch(mode='hooks')"
        )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    structure = families.describe_model(skeleton)
    directions = families.layer_directions(direction, structure, None, device="cpu")
    shard_of, index = _checkpoint_shards(src)

    # checkpoint key -> writer, under the model's own names and without the base model prefix
    writers = {w.name: w for w in structure.writers()}
    prefix = getattr(skeleton, "base_model_prefix", "")
    for name in list(writers):  # checkpoints may omit the base model prefix (e.g. GPT-2's "transformer.")
        if prefix and name.startswith(f"{prefix}."):
            writers.setdefault(name[len(prefix) + 1 :], writers[name])
    expert_key = families.per_expert_checkpoint_key(structure)
    # A per-expert key shares the post-norm of its layer's MLP writers (the last ones of the layer).
    mlp_writer_of_layer = {layer.index: layer.writers[-1] for layer in structure.layers}

    def writer_for(key: str) -> tuple[str, int | None, families.ResidualWriter] | None:
        if key in writers:
            writer = writers[key]
            return writer.layout, writer.layer, writer
        match = expert_key.match(key)
        if match:
            layer = int(match.group(1))
            return families.MATRIX, layer, mlp_writer_of_layer[layer]
        return None

    gains: dict[str, torch.Tensor] = {}

    def target_for(layer: int | None, writer: families.ResidualWriter) -> torch.Tensor:
        base = directions[0] if layer is None else directions[layer]
        if writer.post_norm is None:
            return families.writer_direction(base, None)
        norm_key = writer.post_norm_weight_name
        if norm_key not in gains:
            with safe_open(src / shard_of[norm_key], "pt") as file:
                gains[norm_key] = families.norm_gain_from_weight(writer.post_norm, file.get_tensor(norm_key))
        return families.writer_direction(base, gains[norm_key])

    tied = weights.head_is_tied(skeleton, structure)
    if tied:
        embedding_name = next(w.name for w in structure.embeddings if w.parameter is structure.token_embedding.weight)
        embedding_key = next(k for k, w in writers.items() if w.name == embedding_name and k in shard_of)
        head_key = next(
            name
            for name, parameter in skeleton.named_parameters(remove_duplicate=False)
            if parameter is structure.token_embedding.weight and name != embedding_name
        )

    with atomic_directory(dst_dir, overwrite, [src]) as temporary:
        for item in src.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name != SAFETENSORS_INDEX:
                shutil.copy2(item, temporary / item.name)
        total_size = 0
        for shard in sorted(set(shard_of.values())):
            with safe_open(src / shard, "pt") as file:
                entries = []
                for key in file.keys():  # noqa: SIM118  (safe_open is not iterable)
                    tensor_slice = file.get_slice(key)
                    dtype_tag, shape = tensor_slice.get_dtype(), tensor_slice.get_shape()
                    if tied and key == embedding_key:
                        # Before the embedding: get_tensor maps the file copy-on-write, so once the
                        # embedding is orthogonalized in place, this mapping no longer shows the original.
                        entries.append((head_key, dtype_tag, shape, lambda key=key: file.get_tensor(key)))
                    entries.append((key, dtype_tag, shape, _loader(file, key, writer_for(key), target_for, scale)))
                total_size += _write_safetensors(temporary / shard, entries, file.metadata())
        if tied:
            shard_of[head_key] = shard_of[embedding_key]
            _untie_config(temporary / "config.json")
        if index is not None:
            index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total_size}}
            index["weight_map"] = dict(sorted(shard_of.items()))
            (temporary / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return Path(dst_dir).expanduser().resolve()


def _loader(file, key, writer_info, target_for, scale):
    """A function that reads `key` and, if it is a residual writer, orthogonalizes it."""

    def load() -> torch.Tensor:
        tensor = file.get_tensor(key)
        if writer_info is not None:
            layout, layer, writer = writer_info
            target = target_for(layer, writer)
            if layout == families.MATRIX:
                ops.orthogonalize_(tensor, target, scale)
            else:
                ops.ablate_(tensor, target, scale)
        return tensor

    return load


def _untie_config(path: Path) -> None:
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
