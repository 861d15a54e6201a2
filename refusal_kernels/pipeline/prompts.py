"""Load instruction prompts from files or dataset hubs, and split them into the `PromptSets` of a run.

Supported sources: JSON (a list of strings or of objects), JSONL, CSV and TXT (one prompt per
line) files, a dataset hub ID (when the ``datasets`` package is installed), and the package's
own harmful/harmless sets via :func:`builtin_prompts`.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["INSTRUCTION_FIELDS", "PromptSets", "builtin_prompts", "load_prompts", "train_val_split"]

# Column names that hold the instruction in common refusal datasets, in order of preference.
INSTRUCTION_FIELDS = ("instruction", "prompt", "goal", "behavior", "forbidden_prompt", "text", "question", "query")
BUILTIN_KINDS = ("harmful", "harmless")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")


def load_prompts(source: str | Path, *, field: str | None = None) -> list[str]:
    """Load a list of instruction prompts.

    Args:
        source: path to a ``.json``, ``.jsonl``, ``.csv`` or ``.txt`` file, or, when no such path
            exists, a dataset hub ID loaded with ``datasets`` (split ``train``).
        field: name of the column holding the instruction; detected among
            :data:`INSTRUCTION_FIELDS` (case-insensitively) when omitted.

    Returns:
        The non-empty prompts, stripped of surrounding whitespace, in file order.

    Raises:
        ValueError: the file is missing, empty, of an unknown type, or has no instruction field.
    """
    path = Path(source)
    if path.exists():
        rows = _read_file(path)
        origin = f"file {path}"
    elif path.suffix.lower() in FILE_SUFFIXES or path.is_absolute() or str(source).startswith("."):
        raise ValueError(f"source: file {path} does not exist")
    else:
        rows = _read_hub(str(source))
        origin = f"dataset {source}"
    prompts = _instructions(rows, field=field, origin=origin)
    if not prompts:
        raise ValueError(f"source: {origin} contains no prompts")
    return prompts


def builtin_prompts(kind: str) -> list[str]:
    """Return the package's own ``"harmful"`` or ``"harmless"`` instruction set."""
    if kind not in BUILTIN_KINDS:
        raise ValueError(f"kind must be one of {BUILTIN_KINDS}, got {kind!r}")
    text = resources.files("refusal_kernels.pipeline").joinpath("data", f"{kind}.json").read_text(encoding="utf-8")
    return _instructions(json.loads(text), field="instruction", origin=f"builtin {kind} set")


def train_val_split(
    prompts: Sequence[str],
    *,
    val_fraction: float | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Shuffle ``prompts`` with ``seed`` and split them into disjoint train and validation lists.

    Give either ``val_fraction`` (the rest is train) or ``n_train`` and/or ``n_val`` (sampled
    without replacement; an omitted count takes the remaining prompts).
    """
    if val_fraction is not None and (n_train is not None or n_val is not None):
        raise ValueError("give either val_fraction or n_train/n_val, not both")
    total = len(prompts)
    if val_fraction is not None:
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        n_val = round(total * val_fraction)
        n_train = total - n_val
    elif n_train is None and n_val is None:
        raise ValueError("give val_fraction or n_train/n_val")
    else:
        if any(n is not None and n < 0 for n in (n_train, n_val)):
            raise ValueError(f"n_train and n_val must be non-negative, got {n_train} and {n_val}")
        n_train = total - n_val if n_train is None else n_train
        n_val = total - n_train if n_val is None else n_val
        if n_train + n_val > total:
            raise ValueError(f"n_train + n_val = {n_train + n_val} exceeds the {total} prompts available")
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:n_train], shuffled[n_train : n_train + n_val]


@dataclass
class PromptSets:
    """The instructions of a run: train sets for the means, held-out sets for scoring and evaluation.

    Plain text; the chat template is applied where they are used. ValueError names a set that
    is empty, TypeError one that holds something other than strings.
    """

    harmful: list[str]
    harmless: list[str]
    harmful_val: list[str]
    harmless_val: list[str]

    def __post_init__(self) -> None:
        for name in (f.name for f in fields(self)):
            prompts = getattr(self, name)
            if isinstance(prompts, str) or not isinstance(prompts, Sequence):
                raise TypeError(f"{name} must be a list of strings, got {type(prompts).__name__}")
            if not all(isinstance(p, str) for p in prompts):
                raise TypeError(f"{name} must hold only strings")
            if not prompts:
                raise ValueError(f"{name} is empty")
            setattr(self, name, list(prompts))

    @classmethod
    def split(
        cls,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        n_train: int,
        n_val: int,
        seed: int,
        harmful_val: Sequence[str] | None = None,
        harmless_val: Sequence[str] | None = None,
    ) -> PromptSets:
        """A held-out set not given is split off its training set (seeded; at most half of a small
        set goes to it); the training sets are then cut to n_train."""
        if harmful_val is None:
            harmful, harmful_val = _held_out(harmful, n_val, seed)
        if harmless_val is None:
            harmless, harmless_val = _held_out(harmless, n_val, seed)
        return cls(list(harmful)[:n_train], list(harmless)[:n_train], list(harmful_val), list(harmless_val))

    @classmethod
    def builtin(cls, *, n_train: int, n_val: int, seed: int) -> PromptSets:
        """The package's own harmful and harmless sets, split as `split` does."""
        return cls.split(
            builtin_prompts("harmful"), builtin_prompts("harmless"), n_train=n_train, n_val=n_val, seed=seed
        )


def _held_out(prompts: Sequence[str], n_val: int, seed: int) -> tuple[list[str], list[str]]:
    return train_val_split(prompts, n_val=min(n_val, len(prompts) // 2), seed=seed)


def _read_file(path: Path) -> list[Any]:
    """Parse ``path`` into a list of strings or mappings according to its extension."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"source: unknown extension {suffix!r} of file {path}; expected one of {FILE_SUFFIXES}")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise ValueError(f"source: file {path} is empty")
    if suffix == ".txt":
        return text.splitlines()
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    data = json.loads(text)
    if isinstance(data, Mapping):
        # Some datasets wrap the rows, e.g. {"data": [...]}: take the single list value.
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise ValueError(f"source: file {path} holds an object without a single list of prompts")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"source: file {path} must hold a JSON list, got {type(data).__name__}")
    return data


def _read_hub(dataset_id: str) -> list[Any]:
    """Load the ``train`` split of a dataset hub ID with ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"source: {dataset_id!r} is not an existing file, and loading it as a dataset hub ID needs "
            "the `datasets` package (pip install datasets)"
        ) from None
    return list(datasets.load_dataset(dataset_id, split="train"))


def _instructions(rows: Iterable[Any], *, field: str | None, origin: str) -> list[str]:
    """Extract the stripped, non-empty instruction of every row (a string or a mapping)."""
    rows = list(rows)
    records = [row for row in rows if isinstance(row, Mapping)]
    if not records:
        return [row.strip() for row in rows if isinstance(row, str) and row.strip()]
    columns = list(dict.fromkeys(key for record in records for key in record))
    column = _instruction_column(columns, field=field, origin=origin)
    return [str(record[column]).strip() for record in records if record.get(column) and str(record[column]).strip()]


def _instruction_column(columns: list[str], *, field: str | None, origin: str) -> str:
    """Pick the column that holds the instruction, by ``field`` or among :data:`INSTRUCTION_FIELDS`."""
    by_lower_name = {str(column).lower(): column for column in columns}
    if field is not None:
        if field in columns:
            return field
        if field.lower() in by_lower_name:
            return by_lower_name[field.lower()]
        raise ValueError(f"field: {field!r} is not a column of {origin}; columns found: {columns}")
    for candidate in INSTRUCTION_FIELDS:
        if candidate in by_lower_name:
            return by_lower_name[candidate]
    raise ValueError(
        f"source: no instruction field in {origin}; columns found: {columns}. "
        f"Expected one of {list(INSTRUCTION_FIELDS)}, or name it with field="
    )
