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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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
    _refuse_quantized(config, src_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    structure = families.describe_model(skeleton)
    directions = families.layer_directions(direction, structure, None, device="cpu")
    shard_of, index = _checkpoint_shards(src)
    edits = _WriterEdits(src, shard_of, skeleton, structure, directions, scale)
    tied_head = _tied_head(skeleton, structure, edits.writers, shard_of)

    with atomic_directory(dst_dir, overwrite, [src]) as temporary:
        _copy_other_files(src, temporary)
        total_size = sum(
            _write_shard(src / shard, temporary / shard, edits, tied_head) for shard in sorted(set(shard_of.values()))
        )
        if tied_head is not None:
            shard_of[tied_head.head_key] = shard_of[tied_head.embedding_key]
            _untie_config(temporary / "config.json")
        if index is not None:
            _write_index(temporary / SAFETENSORS_INDEX, index, shard_of, total_size)
    return Path(dst_dir).expanduser().resolve()


def _refuse_quantized(config: Any, src_dir: str | os.PathLike[str]) -> None:
    # The skeleton is built dense, so packed keys (qweight, ...) would match no writer and be copied unedited.
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        raise ValueError(
            f"src_dir {str(src_dir)!r} is a quantized checkpoint (quant_method {method!r}), which cannot be streamed: "
            "load it and use orthogonalize_model_, or patch(mode='hooks')"
        )


def _writers_by_key(
    skeleton: torch.nn.Module, structure: families.ModelStructure
) -> dict[str, families.ResidualWriter]:
    """Checkpoint key -> writer, under the model's own names and without the base model prefix."""
    writers = {w.name: w for w in structure.writers()}
    prefix = getattr(skeleton, "base_model_prefix", "")
    for name in list(writers):  # checkpoints may omit the base model prefix (e.g. GPT-2's "transformer.")
        if prefix and name.startswith(f"{prefix}."):
            writers.setdefault(name[len(prefix) + 1 :], writers[name])
    return writers


class _WriterEdits:
    """Which checkpoint keys are residual writers, and how each one is orthogonalized."""

    def __init__(
        self,
        src: Path,
        shard_of: dict[str, str],
        skeleton: torch.nn.Module,
        structure: families.ModelStructure,
        directions: torch.Tensor,
        scale: float,
    ) -> None:
        self.writers = _writers_by_key(skeleton, structure)
        self._expert_key = families.per_expert_checkpoint_key(structure)
        # A per-expert key shares the post-norm of its layer's MLP writers (the last ones of the layer).
        self._mlp_writer_of_layer = {layer.index: layer.writers[-1] for layer in structure.layers}
        self._src, self._shard_of, self._directions, self._scale = src, shard_of, directions, scale
        self._gains: dict[str, torch.Tensor] = {}  # post-norm key -> gain, each read once

    def writer_for(self, key: str) -> tuple[str, int | None, families.ResidualWriter] | None:
        """(layout, layer, writer) of the writer stored under `key`; None if it is not one."""
        if key in self.writers:
            writer = self.writers[key]
            return writer.layout, writer.layer, writer
        match = self._expert_key.match(key)
        if match:
            layer = int(match.group(1))
            return families.MATRIX, layer, self._mlp_writer_of_layer[layer]
        return None

    def target_for(self, layer: int | None, writer: families.ResidualWriter) -> torch.Tensor:
        base = self._directions[0] if layer is None else self._directions[layer]
        if writer.post_norm is None:
            return families.writer_direction(base, None)
        norm_key = writer.post_norm_weight_name
        if norm_key not in self._gains:
            with safe_open(self._src / self._shard_of[norm_key], "pt") as file:
                self._gains[norm_key] = families.norm_gain_from_weight(writer.post_norm, file.get_tensor(norm_key))
        return families.writer_direction(base, self._gains[norm_key])

    def loader(self, file: Any, key: str) -> Callable[[], torch.Tensor]:
        """A function that reads `key` and, if it is a residual writer, orthogonalizes it."""
        writer_info = self.writer_for(key)

        def load() -> torch.Tensor:
            tensor = file.get_tensor(key)
            if writer_info is not None:
                layout, layer, writer = writer_info
                target = self.target_for(layer, writer)
                if layout == families.MATRIX:
                    ops.orthogonalize_(tensor, target, self._scale)
                else:
                    ops.ablate_(tensor, target, self._scale)
            return tensor

        return load


class _TiedHead(NamedTuple):
    embedding_key: str  # the embedding's checkpoint key
    head_key: str  # the head's parameter name, written with the original embedding


def _tied_head(
    skeleton: torch.nn.Module,
    structure: families.ModelStructure,
    writers: dict[str, families.ResidualWriter],
    shard_of: dict[str, str],
) -> _TiedHead | None:
    """The keys of a head tied to the embeddings, which is written untied; None if the head is not tied."""
    if not weights.head_is_tied(skeleton, structure):
        return None
    embedding_name = next(w.name for w in structure.embeddings if w.parameter is structure.token_embedding.weight)
    embedding_key = next(k for k, w in writers.items() if w.name == embedding_name and k in shard_of)
    head_key = next(
        name
        for name, parameter in skeleton.named_parameters(remove_duplicate=False)
        if parameter is structure.token_embedding.weight and name != embedding_name
    )
    return _TiedHead(embedding_key, head_key)


def _copy_other_files(src: Path, dst: Path) -> None:
    """Copy config, tokenizer and other files; the shards and their index are written anew."""
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != SAFETENSORS_INDEX:
            shutil.copy2(item, dst / item.name)


def _write_shard(src_shard: Path, dst_shard: Path, edits: _WriterEdits, tied_head: _TiedHead | None) -> int:
    """Write one shard with its writers orthogonalized; returns its number of data bytes."""
    with safe_open(src_shard, "pt") as file:
        entries = []
        for key in file.keys():  # noqa: SIM118  (safe_open is not iterable)
            tensor_slice = file.get_slice(key)
            dtype_tag, shape = tensor_slice.get_dtype(), tensor_slice.get_shape()
            if tied_head is not None and key == tied_head.embedding_key:
                # Before the embedding: get_tensor maps the file copy-on-write, so once the
                # embedding is orthogonalized in place, this mapping no longer shows the original.
                entries.append((tied_head.head_key, dtype_tag, shape, lambda key=key: file.get_tensor(key)))
            entries.append((key, dtype_tag, shape, edits.loader(file, key)))
        return _write_safetensors(dst_shard, entries, file.metadata())


def _write_index(path: Path, index: dict, shard_of: dict[str, str], total_size: int) -> None:
    index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total_size}}
    index["weight_map"] = dict(sorted(shard_of.items()))
    path.write_text(json.dumps(index, indent=2) + "\n")


def _untie_config(path: Path) -> None:
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
