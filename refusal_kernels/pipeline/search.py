"""`search`: optimize refusals against KL over how the direction is built and applied, as heretic does.

Each trial picks (see `SearchSpace`):
  * the direction: a fractional layer index (interpolated between two layers' directions, see
    `variants.interpolate`) or each layer's own direction ("per layer");
  * projected or not: the global direction biprojected against each target layer's harmless
    mean, or each per-layer direction projected against its own (see `variants`);
  * an attention and an MLP `Peak` (heretic's per-layer weight kernel);
  * norm preservation on or off (`orthogonalize_model_(..., norm_preserving=True)`).

The means are fitted once (`select.candidate_means`) and the base logits computed once. A trial
edits the weights in place with `orthogonalize_model_(..., undo=True)`, scores the model and
restores it with `undo_`, so no copy of the model is ever made. Scoring is done in two stages
(successive halving):

  1. every trial: the refusal score (log-odds of the refusal tokens, see `judge`) on a small
     set of harmful prompts and the KL(base || edited) of the next-token distribution on
     harmless prompts, from one batched last-token pass over both sets;
  2. the best `judge_fraction` of the trials (by non-dominated sorting on those two numbers):
     greedy answers of a few tokens to a fixed set of harmful prompts, counted by the
     substring judge, in one batched generation.

The trials are proposed by Optuna's multi-objective TPE sampler when `optuna` is installed
(`pip install refusal-kernels[search]`), else drawn at random; both minimize (refusal score,
KL). The result is the Pareto front of (refusals, KL) over the judged trials: `SearchResult`,
saved as search.json, means.pt, pareto.md and pareto.png.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import hf
from ..hf.schedule import Peak, Schedule
from . import chat, judge, select, variants
from .options import SAMPLERS, SearchOptions, SearchSpace
from .prompts import PromptSets
from .report import SCORE_NAMES, DirectionResult, atomic_write
from .scoring import Sites, kl_from_base, last_token_logits
from .timing import Stopwatch

PER_LAYER = "per layer"


@dataclass(frozen=True)
class TrialParams:
    """What one trial applies.

    direction_index: the fractional layer index of the global direction, or None for per-layer
        directions.
    attention, mlp: each component's Peak.
    norm_preserving: keep every residual vector's norm (see `hf.orthogonalize_model_`).
    projected: project the direction(s) against the harmless means (see the module docstring).
    """

    direction_index: float | None
    attention: Peak
    mlp: Peak
    norm_preserving: bool
    projected: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrialParams:
        return cls(
            direction_index=data["direction_index"],
            attention=Peak(**data["attention"]),
            mlp=Peak(**data["mlp"]),
            norm_preserving=bool(data["norm_preserving"]),
            projected=bool(data["projected"]),
        )

    def describe(self) -> str:
        """One line: direction, projection, norm preservation and both peaks."""
        where = PER_LAYER if self.direction_index is None else f"layer {self.direction_index:.2f}"
        flags = [flag for flag, on in (("projected", self.projected), ("norm-preserving", self.norm_preserving)) if on]

        def peak(p: Peak) -> str:
            return f"{p.max_weight:.2f}@{p.max_weight_position:.1f}->{p.min_weight:.2f}/{p.min_weight_distance:.1f}"

        return f"{where}{''.join(', ' + f for f in flags)}; attn {peak(self.attention)}, mlp {peak(self.mlp)}"


@dataclass
class Trial:
    """One trial's parameters and measurements.

    refusal_score: mean refusal score on the score set (lower: fewer refusals).
    kl: mean KL(base || edited) of the next-token distribution on the harmless set.
    refusals: how many of the judge set's answers the substring judge calls refusals; None
        when the trial was pruned before judging.
    seconds: time spent on this trial (edits, scoring, undo).
    """

    number: int
    params: TrialParams
    refusal_score: float
    kl: float
    refusals: int | None = None
    seconds: float = 0.0


@dataclass
class SearchResult:
    """Every trial, the baseline, the means the directions are built from, and the Pareto front.

    means: {"harmful": [n_layers, d_model], "harmless": [n_layers, d_model]} fp32, at `position`.
    baseline: the unedited model's refusal_score, refusals (and kl = 0).
    prompts: prompts used per set (harmful_train, harmless_train, score, kl, judge).
    """

    trials: list[Trial]
    means: dict[str, torch.Tensor]
    position: int
    baseline: dict[str, float]
    refusal_tokens: list[int]
    prompts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    sampler: str = "random"
    source: str = ""

    @property
    def n_layers(self) -> int:
        return self.means["harmful"].shape[0]

    @property
    def d_model(self) -> int:
        return self.means["harmful"].shape[1]

    def pareto_front(self) -> list[int]:
        """The judged trials no other judged trial beats on both refusals and KL: their numbers,
        fewest refusals first."""
        judged = [t for t in self.trials if t.refusals is not None]
        front = pareto_front([(t.refusals, t.kl) for t in judged])
        return [judged[i].number for i in sorted(front, key=lambda i: (judged[i].refusals, judged[i].kl))]

    def trial(self, number: int) -> Trial:
        """The trial with this number.

        Raises:
            ValueError: no such trial.
        """
        for trial in self.trials:
            if trial.number == number:
                return trial
        raise ValueError(f"trial {number} does not exist: the search ran trials 0..{len(self.trials) - 1}")

    def direction(self, number: int) -> torch.Tensor:
        """The direction(s) trial `number` applies: [d_model] or one per layer [n_layers, d_model]."""
        return trial_direction(self.trial(number).params, self.means["harmful"], self.means["harmless"])

    def direction_result(self, number: int) -> DirectionResult:
        """Trial `number`'s direction(s) as a DirectionResult (unscored), for reports and direction.pt.

        layer is the nearest layer to a global direction's index (0 for per-layer directions);
        variant names how the direction was built.
        """
        params = self.trial(number).params
        if params.direction_index is None:
            layer, variant = 0, "per-layer projected" if params.projected else "per-layer"
        else:
            layer = round(params.direction_index)
            variant = f"interpolated at {params.direction_index:.3f}" + (", biprojected" if params.projected else "")
        return DirectionResult(
            direction=self.direction(number),
            layer=layer,
            position=self.position,
            n_layers=self.n_layers,
            positions=[self.position],
            scores={name: torch.full((self.n_layers, 1), math.nan) for name in SCORE_NAMES},
            refusal_tokens=self.refusal_tokens,
            prompts=self.prompts,
            timings=self.timings,
            source=self.source,
            variant=variant,
        )

    def apply(
        self, model: nn.Module, number: int, *, undo: bool | str = False, verify: bool = True
    ) -> hf.OrthogonalizationRecord:
        """Edit `model` in place as trial `number` did (see `apply_trial`)."""
        return apply_trial(model, self.trial(number).params, self.means, undo=undo, verify=verify)

    def pareto_table(self) -> str:
        """The Pareto front as a Markdown table, with the baseline first."""
        n_judge = self.prompts.get("judge", 0)
        lines = [
            "| trial | refusals | KL | refusal score | direction and schedule |",
            "| ---: | ---: | ---: | ---: | --- |",
            f"| base | {self.baseline['refusals']:.0f}/{n_judge} | 0 | {self.baseline['refusal_score']:.2f} | unedited |",
        ]
        for number in self.pareto_front():
            t = self.trial(number)
            lines.append(
                f"| {t.number} | {t.refusals}/{n_judge} | {t.kl:.4f} | {t.refusal_score:.2f} | {t.params.describe()} |"
            )
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "sampler": self.sampler,
            "position": self.position,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "baseline": self.baseline,
            "refusal_tokens": self.refusal_tokens,
            "prompts": self.prompts,
            "timings": self.timings,
            "pareto_front": self.pareto_front(),
            "trials": [{**asdict(t), "params": t.params.to_dict()} for t in self.trials],
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write search.json, means.pt, pareto.md and pareto.png into out_dir (each atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "means.pt", lambda f: torch.save(self.means, f))
        atomic_write(out / "search.json", lambda f: f.write(json.dumps(self.to_json(), indent=2).encode()))
        atomic_write(out / "pareto.md", lambda f: f.write(self.pareto_table().encode()))
        atomic_write(out / "pareto.png", lambda f: plot_pareto(self, f))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchResult:
        """Read a saved search: its directory, or its search.json (means.pt next to it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "search.json"
        data = json.loads(path.read_text())
        means = torch.load(path.parent / "means.pt", map_location="cpu", weights_only=True)
        trials = [Trial(**{**t, "params": TrialParams.from_dict(t["params"])}) for t in data["trials"]]
        return cls(
            trials=trials,
            means=means,
            position=data["position"],
            baseline=data["baseline"],
            refusal_tokens=data["refusal_tokens"],
            prompts=data["prompts"],
            timings=data["timings"],
            sampler=data["sampler"],
            source=data["source"],
        )


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (<= in every objective, < in one), in order."""
    return [
        i
        for i, p in enumerate(points)
        if not any(all(a <= b for a, b in zip(q, p, strict=True)) and tuple(q) != tuple(p) for q in points)
    ]


def pareto_ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """Non-dominated sorting: 0 for the front, 1 for the front of what is left, and so on."""
    ranks = [-1] * len(points)
    left = list(range(len(points)))
    rank = 0
    while left:
        for i in pareto_front([points[j] for j in left]):
            ranks[left[i]] = rank
        left = [j for j in left if ranks[j] < 0]
        rank += 1
    return ranks


def trial_direction(params: TrialParams, harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """The direction(s) a trial applies, from the means at its position ([n_layers, d_model] each).

    Returns:
        [d_model] for an unprojected global direction, else one per layer [n_layers, d_model].
    """
    directions = variants.difference(harmful, harmless)
    if params.direction_index is None:
        per_layer = variants.per_layer(directions)
        return variants.projected(per_layer, harmless) if params.projected else per_layer
    direction = variants.interpolate(directions, params.direction_index)
    return variants.biprojected(direction, harmless) if params.projected else direction


def trial_schedule(params: TrialParams, n_layers: int) -> Schedule:
    """A trial's per-layer scales: its attention and MLP Peaks, and the embeddings left alone."""
    return Schedule.peaked(n_layers, attention=params.attention, mlp=params.mlp)


def apply_trial(
    model: nn.Module,
    params: TrialParams,
    means: dict[str, torch.Tensor],
    *,
    undo: bool | str = False,
    verify: bool = True,
) -> hf.OrthogonalizationRecord:
    """Orthogonalize `model` in place with a trial's direction(s), schedule and norm preservation.

    The embeddings are left alone, as heretic does.

    Args:
        model: the model the means were fitted on.
        params: the trial's parameters.
        means: {"harmful", "harmless"}: [n_layers, d_model] fp32 means at the trial's position.
        undo: keep what `hf.undo_` needs to restore the weights (True or "exact", as
            `hf.orthogonalize_model_`).
        verify: run `hf.orthogonalize_model_`'s self-check (`search` checks once, at setup).

    Returns:
        The OrthogonalizationRecord of `hf.orthogonalize_model_`.
    """
    direction = trial_direction(params, means["harmful"], means["harmless"])
    return hf.orthogonalize_model_(
        model,
        direction,
        scale=trial_schedule(params, means["harmful"].shape[0]),
        include_embeddings=False,
        norm_preserving=params.norm_preserving,
        undo=undo,
        verify=verify,
    )


def _check_options(trials: int, opts: SearchOptions) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")
    for name in ("n_train", "score_prompts", "kl_prompts", "judge_prompts", "judge_tokens", "batch_size"):
        value = getattr(opts, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not 0 < opts.judge_fraction <= 1:
        raise ValueError(f"judge_fraction must be in (0, 1], got {opts.judge_fraction!r}")
    if opts.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {opts.sampler!r}")


class _Sampler:
    """Proposes TrialParams and is told each trial's (refusal score, KL): Optuna's TPE or random."""

    def __init__(self, kind: str, trials: int, seed: int):
        self.kind = kind
        self._random = random.Random(seed)
        self._pending = None
        if kind == "optuna":
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            startup = max(1, math.ceil(0.3 * trials))  # heretic: 60 of 200 trials random
            sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
            self._study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)

    def propose(self, space: SearchSpace, n_layers: int, first_layer: int) -> TrialParams:
        if self.kind == "optuna":
            self._pending = self._study.ask()
            return _sample(space, n_layers, first_layer, self._pending.suggest_float, self._pending.suggest_categorical)
        return _sample(
            space,
            n_layers,
            first_layer,
            lambda name, low, high: self._random.uniform(low, high),
            lambda name, choices: self._random.choice(choices),
        )

    def tell(self, values: tuple[float, float]) -> None:
        if self.kind == "optuna":
            self._study.tell(self._pending, values)


def _sample(
    space: SearchSpace,
    n_layers: int,
    first_layer: int,
    suggest_float: Callable[[str, float, float], float],
    suggest_categorical: Callable[[str, list], object],
) -> TrialParams:
    last = n_layers - 1
    low = min(last, max(first_layer, space.direction[0] * last))
    high = max(low, min(last, space.direction[1] * last))
    scope = suggest_categorical("direction_scope", ["global", PER_LAYER])
    # Sampled even for per-layer directions, as heretic does: multivariate TPE needs fixed parameters.
    index = suggest_float("direction_index", low, high)
    peaks = {}
    for component in ("attention", "mlp"):
        max_weight = suggest_float(f"{component}.max_weight", *space.max_weight)
        position = suggest_float(f"{component}.max_weight_position", *(f * last for f in space.max_weight_position))
        fraction = suggest_float(f"{component}.min_weight", *space.min_weight_fraction)
        distance_high = max(space.min_weight_distance[0], space.min_weight_distance[1] * last)
        distance = suggest_float(f"{component}.min_weight_distance", space.min_weight_distance[0], distance_high)
        peaks[component] = Peak(max_weight, position, fraction * max_weight, distance)
    return TrialParams(
        direction_index=None if scope == PER_LAYER else index,
        attention=peaks["attention"],
        mlp=peaks["mlp"],
        norm_preserving=bool(suggest_categorical("norm_preserving", [False, True])),
        projected=bool(suggest_categorical("projected", [False, True])),
    )


def _resolve_sampler(name: str) -> str:
    if name == "random":
        return name
    try:
        import optuna  # noqa: F401
    except ImportError:
        if name == "optuna":
            raise ImportError("sampler='optuna' needs optuna: pip install refusal-kernels[search]") from None
        return "random"
    return "optuna"


class _Evaluator:
    """The two scoring stages on fixed prompt sets, against base logits computed once."""

    def __init__(self, model, tokenizer, refusal_tokens, score_set, kl_set, judge_set, opts: SearchOptions):
        self.model, self.tokenizer, self.opts = model, tokenizer, opts
        self.refusal_tokens = refusal_tokens
        self.score_set, self.kl_set, self.judge_set = score_set, kl_set, judge_set
        base = self._last_logits()
        self.base_log_probs = torch.log_softmax(base[len(score_set) :], dim=-1)
        self.base_refusal_score = float(judge.refusal_score(base[: len(score_set)], refusal_tokens).mean())

    @torch.inference_mode()
    def _last_logits(self) -> torch.Tensor:
        # One batched pass over both sets: [score + kl, vocab].
        return last_token_logits(self.model, self.tokenizer, self.score_set + self.kl_set, self.opts.batch_size)

    def cheap(self) -> tuple[float, float]:
        """(mean refusal score on the score set, mean KL(base || model) on the KL set)."""
        logits = self._last_logits()
        score = float(judge.refusal_score(logits[: len(self.score_set)], self.refusal_tokens).mean())
        return score, float(kl_from_base(self.base_log_probs, logits[len(self.score_set) :]).mean())

    def refusals(self) -> int:
        """How many greedy answers to the judge set the substring judge calls refusals."""
        answers = judge.generate(
            self.model,
            self.tokenizer,
            self.judge_set,
            max_new_tokens=self.opts.judge_tokens,
            batch_size=self.opts.batch_size,
            description="judge",
        )
        return sum(judge.is_refusal(text) for text in answers.texts)


@torch.inference_mode()
def _refused_prompts(
    model: nn.Module, tokenizer, prompts: Sequence[str], refusal_tokens: Sequence[int], wanted: int, batch_size: int
) -> list[str]:
    """The first `wanted` prompts the model refuses (refusal score > 0), scored a batch at a time
    so that a long list is read only as far as needed.

    Raises:
        select.NoCandidateError: it refuses none of them.
    """
    kept: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        refused = judge.refused(last_token_logits(model, tokenizer, chunk, batch_size), refusal_tokens)
        kept += judge.kept(chunk, refused)
        if len(kept) >= wanted:
            return kept[:wanted]
    if not kept:
        raise select.NoCandidateError("the model refuses none of the harmful_val prompts; pass other prompts")
    return kept


@contextmanager
def _applied(model: nn.Module, params: TrialParams, means: dict[str, torch.Tensor]) -> Iterator[None]:
    """`model` edited as a trial says, and restored on exit even when scoring fails."""
    record = apply_trial(model, params, means, undo=True, verify=False)
    try:
        yield
    finally:
        hf.undo_(record)


@dataclass
class _Setup:
    """What every trial shares: the means, where the direction may go, and the scoring.

    position: the token position of the means (resolved from `opts.position`).
    prompts: how many prompts each set holds, as `SearchResult.prompts`.
    """

    means: dict[str, torch.Tensor]
    n_layers: int
    first_layer: int
    evaluator: _Evaluator
    baseline: dict[str, float]
    refusal_tokens: list[int]
    position: int
    prompts: dict[str, int]


def _prepare(model: nn.Module, tokenizer, sets: PromptSets, n_val: int, opts: SearchOptions) -> _Setup:
    """Fit the means, check the model's structure once, and score the unedited model."""
    refusal_tokens = select.derive_refusal_tokens(model, tokenizer, sets.harmful, opts)
    sites = Sites.of(model)
    fitted = select.candidate_means(
        model,
        tokenizer,
        sets.harmful,
        sets.harmless,
        sites,
        opts.batch_size,
        refusal_tokens if opts.filter_prompts else None,
    )
    means = {kind: getattr(fitted, kind)[:, opts.position].clone() for kind in ("harmful", "harmless")}
    differences = variants.difference(means["harmful"], means["harmless"])
    first_layer = variants.first_useful_layer(differences)
    # The structure is checked once here; the trials then skip the check (their scales are not 1).
    hf.check_structure(model, differences[first_layer], include_embeddings=False)

    harmful_val = sets.harmful_val
    if opts.filter_prompts:
        harmful_val = _refused_prompts(model, tokenizer, harmful_val, refusal_tokens, n_val, opts.batch_size)
    evaluator = _Evaluator(
        model,
        tokenizer,
        refusal_tokens,
        harmful_val[: opts.score_prompts],
        list(sets.harmless_val)[: opts.kl_prompts],
        harmful_val[: opts.judge_prompts],
        opts,
    )
    return _Setup(
        means=means,
        n_layers=len(sites.layers),
        first_layer=first_layer,
        evaluator=evaluator,
        baseline={"refusal_score": evaluator.base_refusal_score, "kl": 0.0, "refusals": evaluator.refusals()},
        refusal_tokens=refusal_tokens,
        position=fitted.positions[opts.position],
        prompts={
            **fitted.kept,
            "score": len(evaluator.score_set),
            "kl": len(evaluator.kl_set),
            "judge": len(evaluator.judge_set),
        },
    )


def _score_trials(model: nn.Module, setup: _Setup, trials: int, sampler_kind: str, opts: SearchOptions) -> list[Trial]:
    """Stage 1: propose, apply, score (refusal score, KL) and undo each of `trials` trials."""
    sampler = _Sampler(sampler_kind, trials, opts.seed)
    done: list[Trial] = []
    for number in tqdm(range(trials), desc=f"search ({sampler_kind})", leave=False):
        clock = time.perf_counter()
        params = sampler.propose(opts.space, setup.n_layers, setup.first_layer)
        with _applied(model, params, setup.means):
            score, kl = setup.evaluator.cheap()
        sampler.tell((score, kl))
        done.append(Trial(number, params, score, kl, seconds=time.perf_counter() - clock))
    return done


def _judge_best(model: nn.Module, setup: _Setup, done: list[Trial], judge_fraction: float) -> None:
    """Stage 2: count the refusals of the best `judge_fraction` of the trials, in place.

    Best: lowest non-dominated rank on (refusal score, KL), then lowest refusal score.
    """
    ranks = pareto_ranks([(t.refusal_score, t.kl) for t in done])
    n_judged = max(1, math.ceil(judge_fraction * len(done)))
    order = sorted(range(len(done)), key=lambda i: (ranks[i], done[i].refusal_score))
    for i in tqdm(order[:n_judged], desc="judge", leave=False):
        clock = time.perf_counter()
        with _applied(model, done[i].params, setup.means):
            done[i].refusals = setup.evaluator.refusals()
        done[i].seconds += time.perf_counter() - clock


def search(
    model: nn.Module,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    trials: int,
    harmful_val: Sequence[str] | None = None,
    harmless_val: Sequence[str] | None = None,
    source: str = "",
    **options,
) -> SearchResult:
    """Search directions, schedules, norm preservation and projection for few refusals at low KL.

    Args:
        model: a transformers causal LM with dense weights (each trial is undone exactly).
        tokenizer: its tokenizer, with a chat template.
        harmful, harmless: instructions; the means are fitted on up to n_train of each. When no
            validation sets are given, each is split into train and validation.
        trials: how many parameter sets to try.
        harmful_val, harmless_val: the prompts the trials are scored on.
        source: where the model came from, for the record.
        options: fields of `SearchOptions`.

    Returns:
        A SearchResult; the model's weights are as they were (within `hf.undo_`'s bound).

    Raises:
        ValueError: a bad argument (named), or empty prompt sets.
        select.NoCandidateError: the model refuses none of the prompts.
    """
    opts = SearchOptions(**options)
    _check_options(trials, opts)
    sampler_kind = _resolve_sampler(opts.sampler)
    n_val = max(opts.score_prompts, opts.kl_prompts, opts.judge_prompts)
    sets = PromptSets.split(
        harmful,
        harmless,
        n_train=opts.n_train,
        n_val=n_val,
        seed=opts.seed,
        harmful_val=harmful_val,
        harmless_val=harmless_val,
    )
    chat.check_position(tokenizer, opts.position)

    stopwatch = Stopwatch()
    setup = _prepare(model, tokenizer, sets, n_val, opts)
    stopwatch.lap("setup")
    done = _score_trials(model, setup, trials, sampler_kind, opts)
    stopwatch.lap("score")
    _judge_best(model, setup, done, opts.judge_fraction)
    stopwatch.lap("judge")

    return SearchResult(
        trials=done,
        means=setup.means,
        position=setup.position,
        baseline=setup.baseline,
        refusal_tokens=setup.refusal_tokens,
        prompts=setup.prompts,
        timings={**stopwatch.laps, "total": stopwatch.elapsed()},
        sampler=sampler_kind,
        source=source,
    )


def plot_pareto(result: SearchResult, file) -> None:
    """Two panels: refusals vs KL of the judged trials (front joined, baseline marked), and the
    refusal score vs KL of every trial."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    front = set(result.pareto_front())
    fig, (judged_ax, cheap_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    judged = [t for t in result.trials if t.refusals is not None]
    others = [t for t in judged if t.number not in front]
    best = sorted((t for t in judged if t.number in front), key=lambda t: t.refusals)
    judged_ax.scatter([t.kl for t in others], [t.refusals for t in others], color="tab:gray", label="judged trials")
    judged_ax.plot([t.kl for t in best], [t.refusals for t in best], "o-", color="tab:red", label="Pareto front")
    for t in best:
        judged_ax.annotate(str(t.number), (t.kl, t.refusals), textcoords="offset points", xytext=(4, 4), fontsize=8)
    judged_ax.scatter([0], [result.baseline["refusals"]], marker="*", s=120, color="black", label="base model")
    judged_ax.set_xlabel("KL(base || edited), harmless")
    judged_ax.set_ylabel(f"refusals of {result.prompts.get('judge', 0)} harmful")
    judged_ax.legend(fontsize=8)
    cheap_ax.scatter(
        [t.kl for t in result.trials],
        [t.refusal_score for t in result.trials],
        c=[
            "tab:red" if t.number in front else ("tab:blue" if t.refusals is not None else "tab:gray")
            for t in result.trials
        ],
    )
    cheap_ax.axhline(result.baseline["refusal_score"], color="black", linestyle=":", label="base model")
    cheap_ax.set_xlabel("KL(base || edited), harmless")
    cheap_ax.set_ylabel("refusal score (red: front, blue: judged, gray: pruned)")
    cheap_ax.set_xscale("symlog", linthresh=1e-3)
    cheap_ax.legend(fontsize=8)
    name = Path(result.source).name if result.source else "model"
    fig.suptitle(f"{name}: {len(result.trials)} trials ({result.sampler})")
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)
