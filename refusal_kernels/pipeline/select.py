"""`find_direction`: the paper's pipeline, from two prompt sets to a selected direction.

1. refusal tokens: first tokens of the model's greedy refusals to harmful training prompts.
2. capture: mean residual activation at every layer input and post-instruction position, over
   the harmful training prompts the model refuses and the harmless ones it answers (the sign
   of their refusal score, read in the same forward pass); candidates r(l, p) = harmful -
   harmless. The validation sets are filtered the same way.
3. score: bypass (refusal score on harmful prompts with r ablated everywhere), then, for the
   best candidates, KL on harmless prompts (ablated vs base) and induce (refusal score on
   harmless prompts with r added at its layer).
4. select: drop layers >= 0.8 L, KL > 0.1 and induce <= 0; take the lowest bypass.

Selection never dead-ends on a model that has candidates: when the filters of step 4 leave
nothing, the first of these rules that has cells chooses (`DirectionResult.rule` records which):

- "filters": the paper's rule above;
- "kl_only": induce relaxed, the lowest bypass among the cells within the KL bound;
- "kl_band": nothing within the KL bound, the lowest bypass among the scored cells whose KL is
  at most KL_BAND times the lowest KL scored.

`fallback=False` keeps the paper's rule alone and raises NoCandidateError instead.

Speed comes from scoring many candidates per forward pass (each row carries its own), from
successive halving on bypass (every candidate on a few prompts, the best fraction on more),
and from computing baseline logits once. Exhaustive scoring (every metric for every candidate
on every validation prompt) is available for comparison.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from . import capture, chat, judge, variants
from .options import FitOptions, SelectionOptions
from .prompts import PromptSets
from .report import SCORE_NAMES, DirectionResult
from .scoring import Scorer, Sites
from .timing import Stopwatch


class NoCandidateError(RuntimeError):
    """No candidate survived the filters; the message says which filter removed what, and
    `scores` holds every score computed ({name: [n_layers, n_positions]}, NaN = unscored)."""

    def __init__(self, message: str, scores: dict[str, torch.Tensor] | None = None):
        super().__init__(message)
        self.scores = scores


@dataclass
class CandidateMeans:
    """The fp32 means every candidate direction is built from (see `variants`).

    harmful, harmless: [n_layers, n_positions, d_model] float32 means at each layer's input.
    positions: the post-instruction positions, as negative indices.
    kept: {"harmful_train": prompts kept, "harmless_train": prompts kept}.
    """

    harmful: torch.Tensor
    harmless: torch.Tensor
    positions: list[int]
    kept: dict[str, int]


def candidate_means(
    model: nn.Module,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    sites: Sites,
    batch_size: int,
    refusal_tokens: Sequence[int] | None = None,
) -> CandidateMeans:
    """Mean harmful and mean harmless activation at every layer's input and post-instruction position.

    With refusal_tokens, only the harmful prompts the model refuses and the harmless ones it
    answers (by the sign of their refusal score) enter the means.
    """
    n_positions = len(chat.post_instruction_ids(tokenizer))
    filters = {"harmful": None, "harmless": None}
    if refusal_tokens is not None:
        filters = {
            "harmful": partial(judge.refused, refusal_tokens=refusal_tokens),
            "harmless": partial(judge.answered, refusal_tokens=refusal_tokens),
        }
    means = {
        kind: capture.mean_activations(
            model,
            sites.layers,
            tokenizer,
            prompts,
            n_positions=n_positions,
            batch_size=batch_size,
            keep=filters[kind],
            description=f"capture {kind}",
        )
        for kind, prompts in (("harmful", harmful), ("harmless", harmless))
    }
    kept = {f"{kind}_train": len(m.kept) for kind, m in means.items()}
    return CandidateMeans(means["harmful"].mean, means["harmless"].mean, list(range(-n_positions, 0)), kept)


def candidate_directions(
    model: nn.Module,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    sites: Sites,
    batch_size: int,
    refusal_tokens: Sequence[int] | None = None,
    variant: str = variants.DIFFERENCE,
) -> tuple[torch.Tensor, list[int], dict[str, int]]:
    """The candidates r(l, p) of one variant (see `variants.candidates`) from `candidate_means`.

    Returns:
        ([n_layers, n_positions, d_model] float32, the positions as negative indices,
        {"harmful_train": prompts kept, "harmless_train": prompts kept}).
    """
    means = candidate_means(model, tokenizer, harmful, harmless, sites, batch_size, refusal_tokens)
    return variants.candidates(means.harmful, means.harmless, variant), means.positions, means.kept


def derive_refusal_tokens(model: nn.Module, tokenizer, harmful: Sequence[str], opts: FitOptions) -> list[int]:
    """The caller's refusal tokens, or the first tokens of the model's refusals to `harmful`."""
    if opts.refusal_tokens is not None:
        return list(opts.refusal_tokens)
    answers = judge.generate(
        model, tokenizer, harmful[: opts.probe_prompts], max_new_tokens=opts.probe_tokens, description="refusal tokens"
    )
    tokens = judge.refusal_token_ids(answers, opts.refusal_phrases)
    if not tokens:
        raise NoCandidateError(
            f"the model refused none of {len(answers.texts)} harmful training prompts, so it has no refusal tokens; "
            "pass refusal_tokens=[...] or prompts it refuses"
        )
    return tokens


def _fit(
    model, tokenizer, harmful, harmless, sites, opts, refusal_tokens
) -> tuple[torch.Tensor, list[int], dict[str, int]]:
    """The candidate directions, over the filtered prompts when opts.filter_prompts.

    Returns (directions, positions, prompts kept per set).
    """
    try:
        return candidate_directions(
            model,
            tokenizer,
            harmful,
            harmless,
            sites,
            opts.batch_size,
            refusal_tokens if opts.filter_prompts else None,
            opts.variant,
        )
    except ValueError as error:
        raise NoCandidateError(f"{error}; pass filter_prompts=False to fit on every prompt") from error


def direction_at(
    model: nn.Module,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layer: int,
    position: int,
    sites: Sites | None = None,
    source: str = "",
    **options,
) -> DirectionResult:
    """The difference of means at a given (layer, position), without any scoring."""
    opts = SelectionOptions(**options)
    sites = sites or Sites.of(model)
    n_layers = len(sites.layers)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    n_positions = chat.check_position(tokenizer, position)
    stopwatch = Stopwatch()
    harmful, harmless = list(harmful)[: opts.n_train], list(harmless)[: opts.n_train]
    # Only the filter needs refusal tokens here: nothing is scored.
    refusal_tokens = derive_refusal_tokens(model, tokenizer, harmful, opts) if opts.filter_prompts else []
    directions, positions, kept = _fit(model, tokenizer, harmful, harmless, sites, opts, refusal_tokens)
    direction = directions[layer, positions.index(position)]
    if not torch.isfinite(direction).all() or direction.norm() == 0:
        raise ValueError(f"the difference of means at layer {layer}, position {position} is zero or not finite")
    return DirectionResult(
        direction=direction.clone(),
        layer=layer,
        position=position,
        n_layers=n_layers,
        positions=positions,
        scores=_unscored(n_layers, n_positions),
        refusal_tokens=refusal_tokens,
        prompts=kept,
        timings={"capture": stopwatch.lap("capture")},
        source=source,
        variant=opts.variant,
        rule="given",
    )


def find_direction(
    model: nn.Module,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    sites: Sites | None = None,
    harmful_val: Sequence[str] | None = None,
    harmless_val: Sequence[str] | None = None,
    source: str = "",
    **options,
) -> DirectionResult:
    """Select the refusal direction of a chat model.

    Args:
        harmful, harmless: instructions (plain text; the chat template is applied here). When
            no validation sets are given, each is split into train and validation.
        sites: where the residual stream is read and written (see `scoring.Sites`); found
            from the model's structure when None.
        options: fields of `SelectionOptions`.
    """
    opts = SelectionOptions(**options)
    sites = sites or Sites.of(model)
    sets = _split_prompts(harmful, harmless, harmful_val, harmless_val, opts)
    stopwatch = Stopwatch()
    refusal_tokens = derive_refusal_tokens(model, tokenizer, sets.harmful, opts)
    stopwatch.lap("refusal_tokens")
    directions, positions, prompts = _fit(model, tokenizer, sets.harmful, sets.harmless, sites, opts, refusal_tokens)
    stopwatch.lap("capture")

    scorer = Scorer(model, tokenizer, sites, refusal_tokens, batch_size=opts.batch_size)
    val = _validation_prompts(scorer, sets.harmful_val, sets.harmless_val, refusal_tokens, opts.filter_prompts)
    prompts.update(harmful_val=len(val.harmful), harmless_val=len(val.harmless))
    baseline_sequences = scorer.sequences
    stopwatch.lap("baseline")

    run = _Scoring(scorer, directions, val, opts)
    within_kl = run.within_kl_by_bypass()
    stopwatch.lap("bypass_kl")
    passing, rule = run.induce_until_passing(within_kl), "filters"
    stopwatch.lap("induce")
    if not passing and opts.fallback:
        passing, rule = run.fallback(within_kl)
    if not passing:
        raise run.no_candidate_error()
    _, layer, p = min(passing)
    return DirectionResult(
        direction=directions[layer, p].clone(),
        layer=layer,
        position=positions[p],
        n_layers=directions.shape[0],
        positions=positions,
        scores=run.scores,
        refusal_tokens=refusal_tokens,
        prompts=prompts,
        filtered=run.filtered,
        timings=stopwatch.laps,
        forward_passes={"used": scorer.sequences, "exhaustive": run.exhaustive_sequences(baseline_sequences)},
        source=source,
        variant=opts.variant,
        rule=rule,
    )


def _split_prompts(harmful, harmless, harmful_val, harmless_val, opts: SelectionOptions) -> PromptSets:
    """The training and validation sets the options ask for (see `PromptSets.split`)."""
    return PromptSets.split(
        harmful,
        harmless,
        n_train=opts.n_train,
        n_val=opts.n_val,
        seed=opts.seed,
        harmful_val=harmful_val,
        harmless_val=harmless_val,
    )


def _unscored(n_layers: int, n_positions: int) -> dict[str, torch.Tensor]:
    """Every score, NaN (unscored) at every (layer, position)."""
    return {name: torch.full((n_layers, n_positions), math.nan) for name in SCORE_NAMES}


@dataclass
class _Validation:
    """The prompts candidates are scored on, and the base model's last logits on the harmless ones."""

    harmful: Sequence[str]
    harmless: Sequence[str]
    base_logits: torch.Tensor


def _validation_prompts(scorer, harmful, harmless, refusal_tokens, filter_prompts) -> _Validation:
    """The validation sets; when filter_prompts, only the harmful prompts the model refuses and
    the harmless ones it answers."""
    base_logits = scorer.last_logits(harmless)
    if not filter_prompts:
        return _Validation(harmful, harmless, base_logits)
    keep_harmless = judge.answered(base_logits, refusal_tokens)
    harmless, base_logits = judge.kept(harmless, keep_harmless), base_logits[keep_harmless]
    harmful = judge.kept(harmful, judge.refused(scorer.last_logits(harmful), refusal_tokens))
    if not harmful:
        raise NoCandidateError(
            "the model refuses none of the harmful_val prompts; pass other prompts or filter_prompts=False"
        )
    if not harmless:
        raise NoCandidateError(
            "the model refuses every one of the harmless_val prompts; pass other prompts or filter_prompts=False"
        )
    return _Validation(harmful, harmless, base_logits)


# A cell is a candidate's (layer, index into the positions).
_Cell = tuple[int, int]

# Early rounds see few prompts, so only a KL estimate this far above the bound prunes there.
EARLY_KL_SLACK = 2.0
# The "kl_band" rule's band: twice the lowest KL still admits candidates that bypass far
# better, while keeping the pick's cost within a factor of the cheapest candidate's.
KL_BAND = 2.0
RULES = ("filters", "kl_only", "kl_band")


@dataclass
class _Scoring:
    """One selection's candidates, with the scores ({name: [n_layers, n_positions]}, NaN =
    unscored) and the filter counts ({filter: cells it removed}) computed so far.

    eligible: the cells worth scoring, found on construction.
    """

    scorer: Scorer
    directions: torch.Tensor  # [n_layers, n_positions, d_model]
    val: _Validation
    opts: SelectionOptions
    scores: dict[str, torch.Tensor] = dataclasses.field(init=False)
    filtered: dict[str, int] = dataclasses.field(default_factory=dict)
    eligible: list[_Cell] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.scores = _unscored(*self.directions.shape[:2])
        self.eligible = self._eligible_cells()

    def _eligible_cells(self) -> list[_Cell]:
        """The cells below the layer bound whose direction is finite and nonzero."""
        n_layers, n_positions = self.directions.shape[:2]
        in_range = [
            (layer, p)
            for layer in range(n_layers)
            if layer < self.opts.max_layer_fraction * n_layers
            for p in range(n_positions)
        ]
        # At layer 0 the post-instruction tokens are the same embeddings in every prompt, so the
        # difference of means there is exactly zero: nothing to ablate.
        norms = self.directions.norm(dim=-1)
        eligible = [(layer, p) for layer, p in in_range if torch.isfinite(norms[layer, p]) and norms[layer, p] > 0]
        self.filtered.update(layer=n_layers * n_positions - len(in_range), zero=len(in_range) - len(eligible))
        return eligible

    def within_kl_by_bypass(self) -> list[_Cell]:
        """Scores bypass and KL, exhaustively or by successive halving; returns the cells within
        the KL bound (best bypass first when halving)."""
        if self.opts.exhaustive:
            ranked, dropped_for_kl = self._score_every_metric(self.eligible), 0
        else:
            ranked, dropped_for_kl = self._successive_halving(self.eligible)
        within_kl = [(layer, p) for layer, p in ranked if self.scores["kl"][layer, p] <= self.opts.kl_threshold]
        self.filtered.update(
            pruned_by_halving=len(self.eligible) - len(ranked) - dropped_for_kl,
            kl=dropped_for_kl + len(ranked) - len(within_kl),
        )
        return within_kl

    def induce_until_passing(self, within_kl: list[_Cell]) -> list[tuple[float, int, int]]:
        """Scores induce for the cells within the KL bound, a chunk at a time in their order, until
        a chunk has cells over the induce threshold; returns those as (bypass, layer, p). With no
        induce threshold, the first cell passes."""
        threshold = self.opts.induce_threshold
        # Exhaustive scoring has every induce score already: one chunk holds every cell.
        chunk = max(len(within_kl), 1) if self.opts.exhaustive else self.opts.finalists
        passing, scored = [], []
        if threshold is None:
            passing = self._with_bypass(within_kl[:1])
        for start in range(0, len(within_kl) if threshold is not None else 0, chunk):
            cells = within_kl[start : start + chunk]
            unscored = [(layer, p) for layer, p in cells if math.isnan(self.scores["induce"][layer, p])]
            if unscored:
                self._score_induce(unscored)
            scored += cells
            passing = self._with_bypass(
                [(layer, p) for layer, p in cells if self.scores["induce"][layer, p] > threshold]
            )
            if passing:
                break
        self.filtered.update(
            induce=len(scored) - len(passing) if threshold is not None else 0,
            not_reached=len(within_kl) - len(scored),
        )
        return passing

    def fallback(self, within_kl: list[_Cell]) -> tuple[list[tuple[float, int, int]], str]:
        """The candidates of the first fallback rule that has any (see the module docstring),
        as (bypass, layer, p), and the rule's name; nothing when no cell was scored."""
        if within_kl:
            return self._with_bypass(within_kl), "kl_only"
        bypass, kl = self.scores["bypass"], self.scores["kl"]
        scored = [(layer, p) for layer, p in self.eligible if math.isfinite(bypass[layer, p] + kl[layer, p])]
        if not scored:
            return [], "kl_band"
        band = KL_BAND * min(kl[cell].item() for cell in scored)
        return self._with_bypass([cell for cell in scored if kl[cell] <= band]), "kl_band"

    def no_candidate_error(self) -> NoCandidateError:
        """The error when no cell passed: which filter removed how many, with every score."""
        filtered, opts = self.filtered, self.opts
        return NoCandidateError(
            f"no candidate survived: {filtered['layer']} removed for layer >= {opts.max_layer_fraction} L, "
            f"{filtered['zero']} for a zero difference of means, "
            f"{filtered['pruned_by_halving']} pruned while halving, {filtered['kl']} for KL > {opts.kl_threshold}, "
            f"{filtered['induce']} for induce <= {opts.induce_threshold}",
            self.scores,
        )

    def exhaustive_sequences(self, baseline_sequences: int) -> int:
        """The sequences exhaustive scoring forwards: the same baseline, then every metric for
        every eligible cell."""
        metrics_on_harmless = 1 if self.opts.induce_threshold is None else 2
        return baseline_sequences + len(self.eligible) * (
            len(self.val.harmful) + metrics_on_harmless * len(self.val.harmless)
        )

    def _candidates(self, cells: list[_Cell]) -> torch.Tensor:
        device = next(self.scorer.model.parameters()).device
        return torch.stack([self.directions[layer, p] for layer, p in cells]).to(device)

    def _record(self, name: str, cells: list[_Cell], values: torch.Tensor) -> None:
        for (layer, p), value in zip(cells, values.tolist(), strict=True):
            self.scores[name][layer, p] = value

    def _with_bypass(self, cells: list[_Cell]) -> list[tuple[float, int, int]]:
        return [(self.scores["bypass"][layer, p].item(), layer, p) for layer, p in cells]

    def _score_induce(self, cells: list[_Cell]) -> None:
        induce = self.scorer.induce(self._candidates(cells), [layer for layer, _ in cells], self.val.harmless)
        self._record("induce", cells, induce)

    def _score_every_metric(self, cells: list[_Cell]) -> list[_Cell]:
        """Scores every metric for every cell on the full validation sets; returns the cells."""
        self._record("bypass", cells, self.scorer.bypass(self._candidates(cells), self.val.harmful))
        self._record("kl", cells, self.scorer.kl(self._candidates(cells), self.val.harmless, self.val.base_logits))
        if self.opts.induce_threshold is not None:
            self._score_induce(cells)
        return cells

    def _successive_halving(self, cells: list[_Cell]) -> tuple[list[_Cell], int]:
        """Prune cells with growing prompt sets: each round scores bypass and KL, drops cells whose
        KL is clearly over the bound, and keeps the best fraction by bypass.

        Returns the last round's cells, scored on the full validation sets, best bypass first, and
        how many cells the early rounds dropped for their KL.
        """
        harmful, harmless, opts = self.val.harmful, self.val.harmless, self.opts
        alive = list(cells)
        dropped_for_kl = 0
        rounds = [n for n in opts.halving_prompts if n < len(harmful)] + [len(harmful)]
        for n in rounds:
            m = min(n, len(harmless))
            candidates = self._candidates(alive)
            bypass = self.scorer.bypass(candidates, harmful[:n])
            kl = self.scorer.kl(candidates, harmless[:m], self.val.base_logits[:m])
            self._record("bypass", alive, bypass)
            self._record("kl", alive, kl)
            final = n == len(harmful)
            keep = len(alive) if final else max(2 * opts.finalists, math.ceil(len(alive) * opts.keep_fraction))
            ranked = [
                alive[i] for i in bypass.argsort().tolist() if final or kl[i] <= EARLY_KL_SLACK * opts.kl_threshold
            ]
            dropped_for_kl += len(alive) - len(ranked)
            alive = ranked[:keep]
            if not alive:
                break
        return alive, dropped_for_kl


def direction_for(
    model: nn.Module,
    tokenizer,
    prompts: PromptSets,
    options: SelectionOptions | None = None,
    *,
    layer: int | None = None,
    position: int | None = None,
    source: str = "",
) -> DirectionResult:
    """`find_direction` over the prompt sets, or, when both layer and position are given, the
    unscored difference of means there (`direction_at`)."""
    fields = dataclasses.asdict(options or SelectionOptions())
    if (layer is None) != (position is None):
        raise ValueError("layer and position go together: give both or neither")
    if layer is not None:
        return direction_at(
            model, tokenizer, prompts.harmful, prompts.harmless, layer=layer, position=position, source=source, **fields
        )
    return find_direction(model, tokenizer, **dataclasses.asdict(prompts), source=source, **fields)
