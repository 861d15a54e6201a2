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
        scores={name: torch.full((n_layers, n_positions), math.nan) for name in SCORE_NAMES},
        refusal_tokens=refusal_tokens,
        prompts=kept,
        timings={"capture": stopwatch.lap("capture")},
        source=source,
        variant=opts.variant,
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
    sets = PromptSets.split(
        harmful,
        harmless,
        n_train=opts.n_train,
        n_val=opts.n_val,
        seed=opts.seed,
        harmful_val=harmful_val,
        harmless_val=harmless_val,
    )
    harmful, harmless, harmful_val, harmless_val = sets.harmful, sets.harmless, sets.harmful_val, sets.harmless_val
    stopwatch = Stopwatch()
    refusal_tokens = derive_refusal_tokens(model, tokenizer, harmful, opts)
    stopwatch.lap("refusal_tokens")
    directions, positions, prompts = _fit(model, tokenizer, harmful, harmless, sites, opts, refusal_tokens)
    n_layers, n_positions = directions.shape[:2]
    stopwatch.lap("capture")

    scorer = Scorer(model, tokenizer, sites, refusal_tokens, batch_size=opts.batch_size)
    base_logits = scorer.last_logits(harmless_val)
    if opts.filter_prompts:
        keep_harmless = judge.answered(base_logits, refusal_tokens)
        harmless_val, base_logits = judge.kept(harmless_val, keep_harmless), base_logits[keep_harmless]
        harmful_val = judge.kept(harmful_val, judge.refused(scorer.last_logits(harmful_val), refusal_tokens))
        if not harmful_val:
            raise NoCandidateError(
                "the model refuses none of the harmful_val prompts; pass other prompts or filter_prompts=False"
            )
        if not harmless_val:
            raise NoCandidateError(
                "the model refuses every one of the harmless_val prompts; pass other prompts or filter_prompts=False"
            )
    prompts.update(harmful_val=len(harmful_val), harmless_val=len(harmless_val))
    baseline_sequences = scorer.sequences
    stopwatch.lap("baseline")

    scores = {name: torch.full((n_layers, n_positions), math.nan) for name in SCORE_NAMES}
    in_range = [
        (layer, p)
        for layer in range(n_layers)
        if layer < opts.max_layer_fraction * n_layers
        for p in range(n_positions)
    ]
    # At layer 0 the post-instruction tokens are the same embeddings in every prompt, so the
    # difference of means there is exactly zero: nothing to ablate.
    norms = directions.norm(dim=-1)
    eligible = [(layer, p) for layer, p in in_range if torch.isfinite(norms[layer, p]) and norms[layer, p] > 0]
    filtered = {"layer": n_layers * n_positions - len(in_range), "zero": len(in_range) - len(eligible)}

    def candidates_of(cells):
        return torch.stack([directions[layer, p] for layer, p in cells]).to(next(model.parameters()).device)

    def record(name, cells, values):
        for (layer, p), value in zip(cells, values.tolist(), strict=True):
            scores[name][layer, p] = value

    if opts.exhaustive:
        ranked, dropped_for_kl = eligible, 0
        record("bypass", ranked, scorer.bypass(candidates_of(ranked), harmful_val))
        record("kl", ranked, scorer.kl(candidates_of(ranked), harmless_val, base_logits))
        if opts.induce_threshold is not None:
            record("induce", ranked, scorer.induce(candidates_of(ranked), [layer for layer, _ in ranked], harmless_val))
        chunk = len(ranked)
    else:
        ranked, dropped_for_kl = _successive_halving(
            scorer, eligible, candidates_of, harmful_val, harmless_val, base_logits, opts, record
        )
        chunk = opts.finalists
    stopwatch.lap("bypass_kl")

    # Induce for the candidates within the KL bound, best bypass first, a chunk at a time.
    within_kl = [(layer, p) for layer, p in ranked if scores["kl"][layer, p] <= opts.kl_threshold]
    passing, scored = [], []
    if opts.induce_threshold is None:
        passing = [(scores["bypass"][layer, p].item(), layer, p) for layer, p in within_kl[:1]]
    for start in range(0, len(within_kl) if opts.induce_threshold is not None else 0, chunk):
        cells = within_kl[start : start + chunk]
        unscored = [(layer, p) for layer, p in cells if math.isnan(scores["induce"][layer, p])]
        if unscored:
            induce = scorer.induce(candidates_of(unscored), [layer for layer, _ in unscored], harmless_val)
            record("induce", unscored, induce)
        scored += cells
        passing = [
            (scores["bypass"][layer, p].item(), layer, p)
            for layer, p in cells
            if scores["induce"][layer, p] > opts.induce_threshold
        ]
        if passing:
            break
    stopwatch.lap("induce")

    filtered["pruned_by_halving"] = len(eligible) - len(ranked) - dropped_for_kl
    filtered["kl"] = dropped_for_kl + len(ranked) - len(within_kl)
    filtered["induce"] = len(scored) - len(passing) if opts.induce_threshold is not None else 0
    filtered["not_reached"] = len(within_kl) - len(scored)
    # Exhaustive scoring: the same baseline, then every metric for every eligible candidate.
    metrics_on_harmless = 1 if opts.induce_threshold is None else 2
    exhaustive_sequences = baseline_sequences + len(eligible) * (
        len(harmful_val) + metrics_on_harmless * len(harmless_val)
    )
    if not passing:
        raise NoCandidateError(
            f"no candidate survived: {filtered['layer']} removed for layer >= {opts.max_layer_fraction} L, "
            f"{filtered['zero']} for a zero difference of means, "
            f"{filtered['pruned_by_halving']} pruned while halving, {filtered['kl']} for KL > {opts.kl_threshold}, "
            f"{filtered['induce']} for induce <= {opts.induce_threshold}",
            scores,
        )
    _, layer, p = min(passing)
    return DirectionResult(
        direction=directions[layer, p].clone(),
        layer=layer,
        position=positions[p],
        n_layers=n_layers,
        positions=positions,
        scores=scores,
        refusal_tokens=refusal_tokens,
        prompts=prompts,
        filtered=filtered,
        timings=stopwatch.laps,
        forward_passes={"used": scorer.sequences, "exhaustive": exhaustive_sequences},
        source=source,
        variant=opts.variant,
    )


# Early rounds see few prompts, so only a KL estimate this far above the bound prunes there.
EARLY_KL_SLACK = 2.0


def _successive_halving(scorer, cells, candidates_of, harmful_val, harmless_val, base_logits, opts, record):
    """Prune cells with growing prompt sets: each round scores bypass and KL, drops cells whose
    KL is clearly over the bound, and keeps the best fraction by bypass.

    Returns the last round's cells, scored on the full validation sets, best bypass first, and
    how many cells the early rounds dropped for their KL.
    """
    alive = list(cells)
    dropped_for_kl = 0
    rounds = [n for n in opts.halving_prompts if n < len(harmful_val)] + [len(harmful_val)]
    for n in rounds:
        m = min(n, len(harmless_val))
        candidates = candidates_of(alive)
        bypass = scorer.bypass(candidates, harmful_val[:n])
        kl = scorer.kl(candidates, harmless_val[:m], base_logits[:m])
        record("bypass", alive, bypass)
        record("kl", alive, kl)
        final = n == len(harmful_val)
        keep = len(alive) if final else max(2 * opts.finalists, math.ceil(len(alive) * opts.keep_fraction))
        ranked = [alive[i] for i in bypass.argsort().tolist() if final or kl[i] <= EARLY_KL_SLACK * opts.kl_threshold]
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
