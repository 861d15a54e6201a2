"""Save an abliterated model so that plain `from_pretrained` loads it, with its record.

Only safetensors are written (never pickle). Every directory is built in a temporary sibling
and renamed into place at the end (`atomic_directory`), so an interruption (an exception,
KeyboardInterrupt) leaves no half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__

METADATA_FILE = "refusal_kernels.json"


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


def write_abliterated(
    model: nn.Module,
    tokenizer: Any,
    directory: Path,
    record: Mapping[str, Any],
    dtype: torch.dtype | None = None,
) -> None:
    """config.json, the safetensors shards, the tokenizer and refusal_kernels.json (`record`)
    into an existing directory; with dtype, the model is cast to it first, in place."""
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")


def checkpoint_record(model: nn.Module, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What refusal_kernels.json holds: the source model, `metadata` (tensors become lists) and
    this package's version. TypeError if metadata is not a mapping."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    return {
        "source_model": getattr(model.config, "_name_or_path", None) or None,
        **_jsonable(dict(metadata)),
        "refusal_kernels_version": __version__,
    }


def source_dtype(spec: str | os.PathLike[str]) -> torch.dtype | None:
    """The dtype a model was stored in: a .gguf file's float16 if its matrices are F16 (and none
    BF16), else bfloat16, since its quantized blocks have no dtype and float32 would double the
    size for nothing; a transformers directory's config dtype; None if unknown."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from ..quant.gguf import container

        types = container.read(path).matrix_types
        return torch.float16 if "F16" in types and "BF16" not in types else torch.bfloat16
    config = path / "config.json"
    if not config.is_file():
        return None
    settings = json.loads(config.read_text())
    stored = settings.get("dtype") or settings.get("torch_dtype")
    return getattr(torch, stored, None) if isinstance(stored, str) else None


def save_abliterated(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any],
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save an orthogonalized model so that plain `AutoModelForCausalLM.from_pretrained` loads it.

    Writes config.json, safetensors shards, the tokenizer with its chat template, and
    refusal_kernels.json: `metadata` (direction, layer, position, scale, scores, ...; tensors
    become lists) plus the source model and this package's version.

    Save a model changed by `orthogonalize_model_` (or `patch(mode="weights")`): hooks are not
    part of a checkpoint. With `dtype` (e.g. `source_dtype(path)`, the dtype the source was
    stored in), the model is cast to it in place before it is written.

    Raises:
        FileExistsError: out_dir exists and is not empty, unless overwrite=True.
        ValueError: out_dir is, contains or lies inside the source model's directory.
        TypeError: metadata is not a mapping.

    `extra(directory)` may add files (reports, plots) to the directory before it is renamed
    into place, so that they appear together with the model or not at all.

    Returns:
        The resolved output directory.
    """
    record = checkpoint_record(model, metadata)
    with atomic_directory(out_dir, overwrite, protected_sources(model)) as temporary:
        write_abliterated(model, tokenizer, temporary, record, dtype)
        if extra is not None:
            extra(temporary)
    return Path(out_dir).expanduser().resolve()


def protected_sources(model: nn.Module) -> list[Path]:
    """The source model's directory, if it has one: an output must not overlap it."""
    source = _source_directory(model)
    return [source] if source else []
