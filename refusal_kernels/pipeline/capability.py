"""Capability benchmarks through lm-evaluation-harness, run on the model in memory.

Removing the refusal direction should cost the model nothing else, so the same benchmark tasks
are scored before and after the edit. `run_tasks` wraps the model object itself in lm-eval's
`HFLM(pretrained=model, tokenizer=tokenizer)` and runs `lm_eval.simple_evaluate` on it. Nothing
is saved or reloaded: an edit in the weights is scored without a save, and a run-time edit
(`with hf.patch(model, r, mode="hooks"):`) is scored as it runs, since HFLM's forward and
generate calls go through the model's forward hooks.

  check_tasks(tasks, tasks_path)            validate the names first (ValueError: close matches)
  run_tasks(model, tokenizer, tasks, ...)   {task: {metric: {"value": float, "stderr": float | None}}}
  scores_from_lm_eval(results)              the same shape from lm-eval's own results["results"]
  comparison_rows / markdown_table          before and after, for report.md and the model card

The model comes back as it was: HFLM puts it in eval mode (its train/eval flags are restored)
and never moves an in-memory model, and its `model.tie_weights()` leaves alone a head that
`orthogonalize_model_` untied (the edit clears config.tie_word_embeddings). simple_evaluate
seeds Python's, NumPy's and torch's global generators, as lm-eval's command line does; the
caller's generator states are restored. HFLM may give its tokenizer a pad token, so it gets a copy.

Task names are those lm-eval's TaskManager indexes: its built-in tasks, groups and tags, and the
YAML task files under `tasks_path`. lm-eval reads `*.yaml` only (not `*.yml`), and skips a file it
cannot parse without a word, so that file's task is then unknown. Indexing the ~14,000 built-in
YAML files takes 20-30 s on 2 CPU cores, so an index is built once per process (again only when
a YAML file under tasks_path changes), and the built-in one not at all when every name is a
task under tasks_path.

Local data files: lm-eval hands `dataset_kwargs` to `datasets.load_dataset` as they are, and
`datasets` resolves a relative `data_files` path against the working directory, not against the
YAML file. So run_tasks builds the tasks, which reads their data, with tasks_path as the
working directory: write data_files relative to tasks_path, and run from any directory.

    # my_tasks/quiz.yaml, next to my_tasks/quiz.jsonl
    task: my_quiz
    dataset_path: json
    dataset_kwargs:
      data_files: {test: quiz.jsonl}

    run_tasks(model, tokenizer, ["my_quiz"], tasks_path="my_tasks")

The working directory is the process's: no other thread should rely on it meanwhile. Absolute
paths and hub datasets are unaffected. lm-eval is optional: `pip install refusal-kernels[eval]`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import check_positive_int

INSTALL_HINT = "pip install refusal-kernels[eval]"

# {task: {metric: {"value": float, "stderr": float | None}}}
Scores = dict[str, dict[str, dict[str, float | None]]]


class LMEvalMissingError(ImportError):
    """lm-eval, the optional `eval` extra, is not installed."""


def _lm_eval(module: str) -> Any:
    # Imported on use, not with this module: lm-eval is optional and takes seconds to import.
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise LMEvalMissingError(
            f"capability benchmarks need lm-eval (no module {error.name!r}): {INSTALL_HINT}"
        ) from error


def _checked_names(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of lm-eval task names, got {tasks!r}")
    if not tasks:
        raise ValueError("tasks is empty: name at least one lm-eval task")
    not_names = [name for name in tasks if not isinstance(name, str)]
    if not_names:
        raise TypeError(f"tasks must hold task names (str), got {not_names!r}")
    return list(tasks)


def _checked_tasks_path(tasks_path: str | os.PathLike | None) -> Path | None:
    if tasks_path is None:
        return None
    path = Path(tasks_path).expanduser()
    if not path.is_dir():
        raise ValueError(f"tasks_path {str(path)!r} {'is not a directory' if path.exists() else 'does not exist'}")
    if not any(path.rglob("*.yaml")):
        yml = " (lm-eval reads only *.yaml files: rename the *.yml ones)" if any(path.rglob("*.yml")) else ""
        raise ValueError(f"tasks_path {str(path)!r} holds no *.yaml task file{yml}")
    return path.resolve()


def _yaml_stamps(root: Path | None) -> tuple[tuple[str, int, int], ...]:
    # The cache key of an index: it is rebuilt when a task file is added, removed or changed.
    if root is None:
        return ()
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*.yaml")))


@functools.lru_cache(maxsize=4)
def _indexed(root: Path | None, include_defaults: bool, stamps: tuple[tuple[str, int, int], ...]) -> Any:
    """A TaskManager over root's YAML files (and lm-eval's own); `stamps` only keys the cache.
    Indexing reads YAML files and nothing else: no network."""
    task_manager = _lm_eval("lm_eval.tasks").TaskManager
    return task_manager(include_path=None if root is None else str(root), include_defaults=include_defaults)


def _task_manager(names: list[str], root: Path | None) -> Any:
    """tasks_path's index alone when every name is a task there (a task names no other, unlike a
    group or tag, and the built-in index costs 20-30 s), else lm-eval's with tasks_path's."""
    if root is not None:
        local = _indexed(root, False, _yaml_stamps(root))
        if set(names) <= set(local.all_subtasks):
            return local
    return _indexed(root, True, _yaml_stamps(root))


def _unknown_tasks_error(unknown: list[str], known: list[str], root: Path | None) -> ValueError:
    hints = []
    for name in unknown:
        matches = difflib.get_close_matches(name, known, n=5)
        hints.append(f"{name!r} (close matches: {', '.join(matches)})" if matches else f"{name!r} (no close match)")
    where = "lm-eval's tasks" if root is None else f"lm-eval's tasks or those in tasks_path {str(root)!r}"
    return ValueError(f"tasks: unknown task {'; '.join(hints)}: not among {where} (`lm-eval ls tasks` lists them)")


def _resolved(tasks: Sequence[str], tasks_path: str | os.PathLike | None) -> tuple[list[str], Path | None, Any]:
    names = _checked_names(tasks)
    root = _checked_tasks_path(tasks_path)
    manager = _task_manager(names, root)
    known = set(manager.all_tasks)
    unknown = [name for name in dict.fromkeys(names) if name not in known]
    if unknown:
        raise _unknown_tasks_error(unknown, manager.all_tasks, root)
    return names, root, manager


def check_tasks(tasks: Sequence[str], tasks_path: str | os.PathLike | None = None) -> list[str]:
    """The task names, checked against lm-eval's index before any model runs.

    Args:
        tasks: lm-eval task, group or tag names, built-in or defined under tasks_path.
        tasks_path: a directory of lm-eval YAML task files (searched recursively), or None.

    Returns:
        The names, as a list.

    Raises:
        TypeError: tasks is a bare str, or holds something other than str.
        ValueError: tasks is empty or names an unknown task (the message lists close matches),
            or tasks_path does not exist, is not a directory, or holds no *.yaml file.
        LMEvalMissingError: lm-eval is not installed (an ImportError).
    """
    return _resolved(tasks, tasks_path)[0]


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    # HFLM calls model.eval(); each module's train/eval flag is put back afterwards.
    modes = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def _global_generators_kept() -> Iterator[None]:
    # simple_evaluate seeds the global generators for a reproducible run; the caller's streams
    # then go on as if nothing had run.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _working_directory(root: Path | None) -> Iterator[None]:
    if root is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(previous)


def _built(manager: Any, name: str) -> list[Any]:
    """The lm-eval Task or Group object that `name` stands for (a tag stands for several tasks)."""
    loaded = manager.load([name])
    groups = loaded.get("groups", {})
    return [groups[name]] if name in groups else list(loaded["tasks"].values())


def _check_run_options(limit: float | None, batch_size: int) -> None:
    check_positive_int("batch_size", batch_size)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, Real) or limit <= 0):
        raise ValueError(f"limit must be None or a positive number (a count, or a fraction below 1), got {limit!r}")


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    tasks_path: str | os.PathLike | None = None,
    limit: float | None = None,
    batch_size: int = 8,
) -> Scores:
    """Score the model as it is in memory, hooks and all, on lm-eval tasks (see the module docstring).

    Args:
        model: a transformers causal LM, on any device; its modes and weights are left as they are.
        tokenizer: its tokenizer (HFLM gets a copy).
        tasks, tasks_path: as for `check_tasks`, which runs first; relative data_files in
            tasks_path's YAML files resolve against tasks_path.
        limit: at most this many documents per task (a float below 1: that fraction); None: all.
        batch_size: passed to HFLM.

    Returns:
        {task: {metric: {"value": float, "stderr": float | None}}}, one entry per task (and per
        group that aggregates its tasks), as `scores_from_lm_eval` reads them.

    Raises:
        As `check_tasks`; ValueError for a bad limit or batch_size. All before the model runs.
    """
    _check_run_options(limit, batch_size)
    names, root, manager = _resolved(tasks, tasks_path)
    hflm = _lm_eval("lm_eval.models.huggingface").HFLM
    simple_evaluate = _lm_eval("lm_eval.evaluator").simple_evaluate
    with _modes_kept(model), _global_generators_kept():
        lm = hflm(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        with _working_directory(root):
            built = [item for name in names for item in _built(manager, name)]
        output = simple_evaluate(model=lm, tasks=built, task_manager=manager, limit=limit, log_samples=False)
    return scores_from_lm_eval(output["results"])


def _number(value: Any) -> float | None:
    # lm-eval writes "N/A" for a stderr it did not compute.
    return float(value) if isinstance(value, Real) and not isinstance(value, bool) else None


def _task_scores(entry: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    found: dict[tuple[str, str], dict[str, float | None]] = {}
    for key, value in entry.items():
        metric, comma, filter_name = key.partition(",")
        # "alias", "name", "sample_len" and such carry no ",filter"; stderrs are read with their metric.
        if not comma or metric.endswith("_stderr") or _number(value) is None:
            continue
        stderr = _number(entry.get(f"{metric}_stderr,{filter_name}"))
        found[metric, filter_name] = {"value": float(value), "stderr": stderr}
    filters_per_metric = Counter(metric for metric, _ in found)
    return {
        metric if filters_per_metric[metric] == 1 else f"{metric},{filter_name}": score
        for (metric, filter_name), score in found.items()
    }


def scores_from_lm_eval(results: Mapping[str, Mapping[str, Any]]) -> Scores:
    """lm-eval's `results["results"]` ({task: {"metric,filter": value, "metric_stderr,filter":
    stderr, "alias": ...}}) as {task: {metric: {"value", "stderr"}}}.

    A metric is named without its filter unless the task reports it under several filters
    ("exact_match,strict-match" and "exact_match,flexible-extract"); entries that are not
    numbers are left out, and a stderr of "N/A" is None.
    """
    return {task: _task_scores(entry) for task, entry in results.items()}


def comparison_rows(before: Scores, after: Scores) -> list[dict[str, Any]]:
    """One row per (task, metric) of either run: task, metric, before, before_stderr, after,
    after_stderr and delta (after - before); None where a run lacks the metric."""
    rows = []
    for task in dict.fromkeys([*before, *after]):
        old_task, new_task = before.get(task, {}), after.get(task, {})
        for metric in dict.fromkeys([*old_task, *new_task]):
            old, new = old_task.get(metric, {}), new_task.get(metric, {})
            both = old.get("value") is not None and new.get("value") is not None
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "before": old.get("value"),
                    "before_stderr": old.get("stderr"),
                    "after": new.get("value"),
                    "after_stderr": new.get("stderr"),
                    "delta": new["value"] - old["value"] if both else None,
                }
            )
    return rows


def _cell(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"


def markdown_table(before: Scores, after: Scores) -> str:
    """`comparison_rows` as a Markdown table: value ± stderr before and after, and the change."""
    lines = ["| task | metric | before | after | change |", "| --- | --- | ---: | ---: | ---: |"]
    for row in comparison_rows(before, after):
        delta = "n/a" if row["delta"] is None else f"{row['delta']:+.4f}"
        lines.append(
            f"| {row['task']} | {row['metric']} | {_cell(row['before'], row['before_stderr'])} "
            f"| {_cell(row['after'], row['after_stderr'])} | {delta} |"
        )
    return "\n".join(lines)
