"""Loading models, saving abliterated ones, and orthogonalizing checkpoints too large to load.

Only safetensors are read or written (never pickle). Every directory this module writes is
built in a temporary sibling and renamed into place at the end, so an interruption (an
exception, KeyboardInterrupt) leaves no half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .. import ops
from .._version import __version__
from . import families, weights

METADATA_FILE = "refusal_kernels.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"


def _looks_like_path(spec: str) -> bool:
    # A hub ID is "name" or "owner/name"; anything else that does not exist is a missing path.
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.endswith(".gguf")


def _drop_quantization(model: nn.Module) -> None:
    # GGUF weights are dequantized on load, but transformers still marks the model quantized,
    # which would make save_pretrained refuse or write a wrong config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _dequantized_gguf() -> dict[str, Any]:
    # Newer transformers can keep GGUF blocks packed when a matmul kernel is installed; the
    # weights must be plain tensors here, since orthogonalization edits them.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        spec: a local transformers directory (safetensors weights), a `.gguf` file
            (dequantized to `dtype`), or a hub ID such as "Qwen/Qwen2.5-0.5B-Instruct".
        dtype: e.g. torch.bfloat16; None keeps the checkpoint's dtype (float32 for GGUF).
        device_map: passed to from_pretrained ("auto", "cpu", a dict, ...).
        trust_remote_code: passed to from_pretrained.

    Returns:
        (model, tokenizer).

    Raises:
        ValueError: `spec` names a path that does not exist, a directory without config.json,
            or a file that cannot be read (corrupt or not a model).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a path or a hub ID string, got {type(spec).__name__}")
    text = os.fspath(spec)
    path = Path(text).expanduser()
    options: dict[str, Any] = {"device_map": device_map, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        options["dtype"] = dtype

    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"spec {text!r} is a file but not a .gguf file; pass a model directory instead")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, **options, **_dequantized_gguf()
            )
        except Exception as error:
            raise ValueError(f"spec {text!r} could not be read as a GGUF model: {error}") from error
        _drop_quantization(model)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"spec {text!r} is a directory without config.json")
        try:
            model = _auto_class(path, trust_remote_code).from_pretrained(path, use_safetensors=True, **options)
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise ValueError(
                f"spec {text!r}: the weights could not be read (corrupt or incomplete?): {error}"
            ) from error
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    elif _looks_like_path(text):
        raise ValueError(f"spec {text!r} does not exist")
    else:
        model = _auto_class(text, trust_remote_code).from_pretrained(text, use_safetensors=True, **options)
        tokenizer = AutoTokenizer.from_pretrained(text, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def _auto_class(source: str | Path, trust_remote_code: bool):
    """AutoModelForCausalLM, or AutoModelForImageTextToText for a multimodal checkpoint that has no
    causal-LM class (Qwen2.5-VL, LLaVA, ...), so that it loads, and saves, as its own class."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _source_directory(model: nn.Module) -> Path | None:
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_file():
        path = path.parent
    return path.resolve() if path.is_dir() else None


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike[str], overwrite: bool, protected: list[Path]) -> Iterator[Path]:
    """Yields an empty temporary sibling of out_dir, renamed to out_dir when the block succeeds.

    On any exception, KeyboardInterrupt included, the temporary directory is removed and
    out_dir is left as it was. With overwrite, an existing out_dir is renamed away, the new one
    renamed in, and the old one deleted.
    """
    out = Path(out_dir).expanduser().resolve()
    for source in protected:
        if _overlaps(out, source):
            raise ValueError(f"out_dir {str(out)!r} overlaps the source model directory {str(source)!r}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {str(out)!r} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    temporary.mkdir()
    try:
        yield temporary
        if out.is_dir():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
            out.rename(old)
            temporary.rename(out)
            shutil.rmtree(old)
        else:
            temporary.rename(out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    return value


def save_abliterated(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any],
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save an orthogonalized model so that plain `AutoModelForCausalLM.from_pretrained` loads it.

    Writes config.json, safetensors shards, the tokenizer with its chat template, and
    refusal_kernels.json: `metadata` (direction, layer, position, scale, scores, ...; tensors
    become lists) plus the source model and this package's version.

    Save a model changed by `orthogonalize_model_` (or `patch(mode="weights")`): hooks are not
    part of a checkpoint.

    Raises:
        FileExistsError: out_dir exists and is not empty, unless overwrite=True.
        ValueError: out_dir is, contains or lies inside the source model's directory.
        TypeError: metadata is not a mapping.

    `extra(directory)` may add files (reports, plots) to the directory before it is renamed
    into place, so that they appear together with the model or not at all.

    Returns:
        The resolved output directory.
    """
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    source = _source_directory(model)
    record = {
        "source_model": getattr(model.config, "_name_or_path", None) or None,
        **_jsonable(dict(metadata)),
        "refusal_kernels_version": __version__,
    }
    with atomic_directory(out_dir, overwrite, [source] if source else []) as temporary:
        model.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        (temporary / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if extra is not None:
            extra(temporary)
    return Path(out_dir).expanduser().resolve()


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
    about one tensor plus O(d_model): tests/test_hf_io.py measured a peak resident-memory growth
    of 8.9 MiB on a 32 MiB checkpoint whose largest tensor is 8 MiB (writers are changed in
    their copy-on-write mapping, which allocates one tensor; the rest is read and written). The residual writers
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
