"""`abliterate`: the main job as one library call.

Find the direction (or take one, or a search's trial), evaluate the model, remove the
direction (in the weights or by hooks), evaluate again, and return an `AbliterationReport`
that saves itself. Saving the edited model is `hf.save_abliterated(model, tokenizer, out,
metadata=report.checkpoint_metadata(), extra=report.save)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .. import hf
from ..quant.gguf.feedback import DEFAULT_PASSES
from . import select
from .evaluate import Evaluation, evaluate
from .options import AbliterationOptions
from .prompts import PromptSets
from .report import DirectionResult, atomic_write, markdown_report
from .search import SearchResult, trial_schedule
from .timing import Stopwatch


@dataclass
class SearchTrial:
    """Trial `number` of a search: its direction, schedule and norm preservation, in the weights."""

    search: SearchResult
    number: int

    def __post_init__(self) -> None:
        self.search.trial(self.number)  # ValueError for a trial that does not exist


@dataclass
class AbliterationReport:
    source: str  # the model's path or hub ID, as the caller named it
    mode: str
    scale: float
    direction: DirectionResult
    before: Evaluation
    after: Evaluation
    prompts: PromptSets = field(repr=False)
    trial: SearchTrial | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    examples: int = 5
    # The hooks that ablate the direction in "hooks" mode (remove() takes them off); None in "weights" mode.
    hooks: hf.PatchHandle | None = field(default=None, repr=False)

    def trial_summary(self) -> dict | None:
        if self.trial is None:
            return None
        return {"number": self.trial.number, **self.trial.search.trial(self.trial.number).params.to_dict()}

    def to_dict(self) -> dict:
        """The contents of report.json."""
        return {
            "model": self.source,
            "mode": self.mode,
            "scale": self.scale,
            "trial": self.trial_summary(),
            "direction": self.direction.metadata(),
            "before": self.before.summary(),
            "after": self.after.summary(),
            "timings": self.timings,
            "examples": [
                {"prompt": p, "before": b, "after": a}
                for p, b, a in zip(
                    self.prompts.harmful_val[: self.examples],
                    self.before.harmful_answers,
                    self.after.harmful_answers,
                    strict=False,
                )
            ],
        }

    def checkpoint_metadata(self) -> dict:
        """What `hf.save_abliterated` records in refusal_kernels.json next to the weights."""
        metadata = {
            "direction": self.direction.direction,
            "layer": self.direction.layer,
            "position": self.direction.position,
            "scale": self.scale,
            "scores": {"before": self.before.summary(), "after": self.after.summary()},
        }
        if self.trial is not None:
            metadata["trial"] = self.trial_summary()
        return metadata

    def write_gguf(
        self,
        src: str | os.PathLike,
        dst: str | os.PathLike,
        requant: str | None = None,
        feedback_passes: int = DEFAULT_PASSES,
    ) -> hf.GGUFEdit:
        """The same edit, made to the GGUF file the model was loaded from: `hf.orthogonalize_gguf`
        with this report's direction and scale, or its trial's direction and schedule (which
        leave the embeddings alone). A norm-preserving trial raises ValueError: the GGUF edit
        has no norm-preserving form."""
        edit = {"scale": self.scale, "layer": self.direction.layer}
        if self.trial is not None:  # self.direction is then the trial's
            params = self.trial.search.trial(self.trial.number).params
            if params.norm_preserving:
                raise ValueError(
                    f"trial {self.trial.number} is norm-preserving, which the GGUF edit cannot do; "
                    "write it with --format hf"
                )
            schedule = trial_schedule(params, self.trial.search.n_layers)
            edit = {"scale": schedule, "include_embeddings": False, "layer": None}
        return hf.orthogonalize_gguf(
            src,
            dst,
            self.direction.direction,
            position=self.direction.position,
            requant=requant,
            feedback_passes=feedback_passes,
            **edit,
        )

    def save(self, out_dir: str | os.PathLike) -> Path:
        """direction.pt, direction.json, heatmaps.png, report.json and report.md into out_dir."""
        out = self.direction.save(out_dir)
        report = self.to_dict()
        atomic_write(out / "report.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
        atomic_write(out / "report.md", lambda f: f.write(markdown_report(report).encode()))
        return out


def _check_inputs(model, opts: AbliterationOptions, direction, trial) -> None:
    if trial is None:
        return
    if not isinstance(trial, SearchTrial):
        raise TypeError(f"trial must be a SearchTrial, got {type(trial).__name__}")
    if opts.mode != "weights":
        raise ValueError("trial applies a trial's schedule and norm preservation to the weights: use mode='weights'")
    if direction is not None or opts.layer is not None:
        raise ValueError("trial takes its direction from the search: drop direction, layer and position")
    n_layers, d_model = hf.model_shape(model)
    searched = trial.search
    if (searched.n_layers, searched.d_model) != (n_layers, d_model):
        raise ValueError(
            f"the search was run on a model with {searched.n_layers} layers and d_model {searched.d_model}, "
            f"this one has {n_layers} and {d_model}"
        )


def abliterate(
    model: nn.Module,
    tokenizer,
    prompts: PromptSets,
    options: AbliterationOptions | None = None,
    *,
    direction: DirectionResult | None = None,
    trial: SearchTrial | None = None,
    source: str = "",
) -> AbliterationReport:
    """Find the refusal direction of `model` and remove it, evaluating before and after.

    Args:
        prompts: train sets for the direction, held-out sets for the evaluations.
        options: mode, scale, and the direction's selection (`SelectionOptions`).
        direction: use this direction instead of finding one.
        trial: apply a search's trial (its direction, schedule and norm preservation) instead.
        source: the model's name, for the reports.

    Returns:
        The report. In "weights" mode the model is left edited in place; in "hooks" mode the
        hooks stay on (`report.hooks.remove()` takes them off).

    Raises:
        ValueError/TypeError: bad options, or a trial that does not fit the model; the model is
            untouched. The errors of `find_direction` (NoCandidateError) and of the edit's
            self-check (StructureError), which also leave the model untouched.
    """
    opts = options or AbliterationOptions()
    if not isinstance(prompts, PromptSets):
        raise TypeError(f"prompts must be a PromptSets, got {type(prompts).__name__}")
    _check_inputs(model, opts, direction, trial)
    stopwatch = Stopwatch()
    if trial is not None:
        direction = trial.search.direction_result(trial.number)
    elif direction is None:
        direction = select.direction_for(
            model, tokenizer, prompts, opts.selection, layer=opts.layer, position=opts.position, source=source
        )
    stopwatch.lap("direction")
    before = evaluate(model, tokenizer, prompts.harmful_val, prompts.harmless_val, max_new_tokens=opts.max_new_tokens)
    stopwatch.lap("evaluate_before")
    hooks = None
    if trial is not None:
        trial.search.apply(model, trial.number)
    elif opts.mode == "weights":
        hf.orthogonalize_model_(model, direction.direction, scale=opts.scale)
    else:
        hooks = hf.patch(model, direction.direction, scale=opts.scale)
    stopwatch.lap("apply")
    after = evaluate(
        model,
        tokenizer,
        prompts.harmful_val,
        prompts.harmless_val,
        baseline=before,
        max_new_tokens=opts.max_new_tokens,
    )
    stopwatch.lap("evaluate_after")
    return AbliterationReport(
        source=source,
        mode=opts.mode,
        scale=opts.scale,
        direction=direction,
        before=before,
        after=after,
        prompts=prompts,
        trial=trial,
        timings=stopwatch.laps,
        examples=opts.examples,
        hooks=hooks,
    )
