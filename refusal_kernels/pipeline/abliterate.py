"""`abliterate`: the main job as one library call.

Find the direction (or take one, or a search's trial), evaluate the model, remove the
direction (in the weights or by hooks), evaluate again, and return an `AbliterationReport`
that saves itself: the direction's files (direction.pt, direction.json, heatmaps.png),
report.json, report.md, and README.md, the model card the Hugging Face hub shows. Saving the
edited model is `hf.save_abliterated(model, tokenizer, out, metadata=report.checkpoint_metadata(),
extra=report.save)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .. import hf
from ..quant.gguf.feedback import DEFAULT_PASSES
from . import capability, model_judge, select
from .card import model_card
from .evaluate import Evaluation, evaluate
from .model_judge import JudgeComparison, ModelJudge
from .options import AbliterationOptions, CapabilityOptions
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
    # The command line that ran the job (argv), for the model card to repeat; None for a library call.
    command: list[str] | None = None
    # The model formats written beside the report: "hf", "gguf", "lora"; None when not recorded.
    outputs: list[str] | None = None
    include_embeddings: bool = True  # whether the weights edit took the direction out of the embeddings too
    kl_tokens: int = 1  # the positions of the base model's harmless answers its KL averages over
    sizes: dict[str, int | None] | None = None  # bytes on disk: "source" and each output format written
    # Weights mode: what orthogonalize_model_ (or the trial's apply) returned, undo data as asked.
    record: hf.OrthogonalizationRecord | None = field(default=None, repr=False)
    # The lm-eval scores "before" and "after" the edit (capability.Scores each); None: no tasks run.
    capability: dict[str, capability.Scores] | None = None
    # The substring judge against a model judge on the harmful answers "before" and "after"; None: no model judge.
    judges: dict[str, JudgeComparison] | None = None
    dtype: str | None = None  # the dtype the model ran in, for every figure above ("bfloat16", ...)

    def trial_summary(self) -> dict | None:
        if self.trial is None:
            return None
        return {"number": self.trial.number, **self.trial.search.trial(self.trial.number).params.to_dict()}

    def to_dict(self) -> dict:
        """The contents of report.json."""
        return {
            "model": self.source,
            "dtype": self.dtype,
            "command": self.command,
            "outputs": self.outputs,
            "mode": self.mode,
            "scale": self.scale,
            "kl_tokens": self.kl_tokens,
            "include_embeddings": self.include_embeddings,
            "sizes": self.sizes,
            "trial": self.trial_summary(),
            "direction": self.direction.metadata(),
            "before": self.before.summary(),
            "after": self.after.summary(),
            "capability": self.capability,
            "judges": None if self.judges is None else {when: c.to_dict() for when, c in self.judges.items()},
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
            "include_embeddings": self.include_embeddings,
            "scores": {"before": self.before.summary(), "after": self.after.summary()},
        }
        if self.trial is not None:
            metadata["trial"] = self.trial_summary()
        return metadata

    def _rank_one_edit(self, output: str) -> dict:
        """The edit as orthogonalize_model_'s arguments: this report's scale, or its trial's
        schedule (which leaves the embeddings alone). ValueError for a norm-preserving trial,
        which has no form in a GGUF or a LoRA (its update is not rank 1 in each matrix)."""
        if self.trial is None:
            return {"scale": self.scale, "include_embeddings": self.include_embeddings}
        check_rank_one(self.trial, output)
        params = self.trial.search.trial(self.trial.number).params
        return {"scale": trial_schedule(params, self.trial.search.n_layers), "include_embeddings": False}

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
        edit = self._rank_one_edit("the GGUF edit")
        return hf.orthogonalize_gguf(
            src,
            dst,
            self.direction.direction,
            layer=self.direction.layer if self.trial is None else None,
            position=self.direction.position,
            requant=requant,
            feedback_passes=feedback_passes,
            **edit,
        )

    def write_lora(self, model: nn.Module, out_dir: str | os.PathLike) -> hf.LoRAExport:
        """The same edit as a rank-1 PEFT adapter (`hf.export_lora`) in out_dir.

        The adapter is computed from the unedited weights: `model`, edited by `abliterate` with
        options.undo="exact", is restored bit for bit, exported, and edited again (the same
        deterministic edit, so the weights come back bit for bit). ValueError for what a LoRA
        cannot express (see `hf.export_lora`), with nothing written and the model left edited."""
        edit = self._rank_one_edit("a LoRA adapter")
        undo = self.record.undo if self.record is not None else None
        if undo is None or undo.spent or not all(entry.fixes is not None for entry in undo.entries):
            raise ValueError("write_lora needs the model abliterate edited with options.undo='exact'")
        hf.undo_(self.record)
        try:
            return hf.export_lora(
                model, self.direction.direction, out_dir, metadata=self.checkpoint_metadata(), verify=False, **edit
            )
        finally:
            self.record = _weights_edit(
                model, self.direction, self.trial, self.scale, self.include_embeddings, undo="exact", verify=False
            )

    def save(self, out_dir: str | os.PathLike) -> Path:
        """direction.pt, direction.json, heatmaps.png, report.json, report.md and README.md (the
        model card) into out_dir; report.md and README.md are rendered from report.json's dict."""
        out = self.direction.save(out_dir)
        report = self.to_dict()
        atomic_write(out / "report.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
        atomic_write(out / "report.md", lambda f: f.write(markdown_report(report).encode()))
        atomic_write(out / "README.md", lambda f: f.write(model_card(report).encode()))
        return out


def check_rank_one(trial: SearchTrial | None, output: str) -> None:
    """ValueError if `trial` is norm-preserving, which `output` (a GGUF edit, a LoRA adapter)
    cannot express: each matrix's update is then not rank 1."""
    if trial is not None and trial.search.trial(trial.number).params.norm_preserving:
        raise ValueError(
            f"trial {trial.number} is norm-preserving, which {output} cannot express (each "
            "matrix's update is not rank 1); write it with --format hf"
        )


def _weights_edit(
    model: nn.Module,
    direction: DirectionResult,
    trial: SearchTrial | None,
    scale: float,
    include_embeddings: bool,
    undo: bool | str,
    verify: bool = True,
) -> hf.OrthogonalizationRecord:
    """The weights edit `abliterate` makes: the trial's, or the direction's at this scale."""
    if trial is not None:
        return trial.search.apply(model, trial.number, undo=undo, verify=verify)
    return hf.orthogonalize_model_(
        model, direction.direction, scale=scale, include_embeddings=include_embeddings, undo=undo, verify=verify
    )


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


def assess(
    model: nn.Module,
    tokenizer,
    prompts: PromptSets,
    evaluation: Evaluation,
    capability_options: CapabilityOptions | None,
    judge: ModelJudge | None,
) -> tuple[capability.Scores | None, JudgeComparison | None]:
    """What the evaluation's refusal rates do not say: the lm-eval tasks' scores, and a model
    judge's verdicts on the harmful answers against the substring judge's (None where not asked)."""
    scores = None
    if capability_options is not None:
        scores = capability.run_tasks(
            model,
            tokenizer,
            capability_options.tasks,
            tasks_path=capability_options.tasks_path,
            limit=capability_options.limit,
            batch_size=capability_options.batch_size,
        )
    judged = None
    if judge is not None:
        judged = model_judge.judge_answers(
            judge, prompts.harmful_val, evaluation.harmful_answers, reasoning_open=evaluation.reasoning_open
        )
    return scores, judged


def abliterate(
    model: nn.Module,
    tokenizer,
    prompts: PromptSets,
    options: AbliterationOptions | None = None,
    *,
    direction: DirectionResult | None = None,
    trial: SearchTrial | None = None,
    source: str = "",
    judge: ModelJudge | None = None,
) -> AbliterationReport:
    """Find the refusal direction of `model` and remove it, evaluating before and after.

    Args:
        prompts: train sets for the direction, held-out sets for the evaluations.
        options: mode, scale, and the direction's selection (`SelectionOptions`).
        direction: use this direction instead of finding one.
        trial: apply a search's trial (its direction, schedule and norm preservation) instead.
        source: the model's name, for the reports.
        judge: a model judge (`model_judge.LocalJudge` or `EndpointJudge`) that also judges the
            harmful answers before and after, compared with the substring judge in the report.

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
    if opts.capability is not None:  # unknown task names fail before any model run
        capability.check_tasks(opts.capability.tasks, opts.capability.tasks_path)
    stopwatch = Stopwatch()
    if trial is not None:
        direction = trial.search.direction_result(trial.number)
    elif direction is None:
        direction = select.direction_for(
            model, tokenizer, prompts, opts.selection, layer=opts.layer, position=opts.position, source=source
        )
    stopwatch.lap("direction")
    scoring = {"max_new_tokens": opts.max_new_tokens, "kl_tokens": opts.kl_tokens}
    before = evaluate(model, tokenizer, prompts.harmful_val, prompts.harmless_val, **scoring)
    capability_before, judged_before = assess(model, tokenizer, prompts, before, opts.capability, judge)
    stopwatch.lap("evaluate_before")
    hooks = record = None
    include_embeddings = opts.include_embeddings and trial is None
    if opts.mode == "weights":
        record = _weights_edit(model, direction, trial, opts.scale, include_embeddings, opts.undo)
    else:
        hooks = hf.patch(model, direction.direction, scale=opts.scale)
    stopwatch.lap("apply")
    after = evaluate(model, tokenizer, prompts.harmful_val, prompts.harmless_val, baseline=before, **scoring)
    capability_after, judged_after = assess(model, tokenizer, prompts, after, opts.capability, judge)
    stopwatch.lap("evaluate_after")
    return AbliterationReport(
        source=source,
        dtype=hf.loading.precision(model),
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
        include_embeddings=include_embeddings,
        record=record,
        kl_tokens=opts.kl_tokens,
        capability=None if opts.capability is None else {"before": capability_before, "after": capability_after},
        judges=None if judge is None else {"before": judged_before, "after": judged_after},
    )
