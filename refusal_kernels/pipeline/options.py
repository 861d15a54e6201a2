"""The options of every stage, with their defaults: the one place a default is written.

The command line builds its flags' defaults from these fields (tests/test_cli.py checks that
every flag agrees with the field it sets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from . import judge, variants

MODES = ("weights", "hooks")
SAMPLERS = ("auto", "optuna", "random")


@dataclass
class FitOptions:
    """What every direction-finding run shares: the prompts the means are fitted on, and how
    the model's refusals are recognised. `SelectionOptions` and `SearchOptions` extend it."""

    n_train: int = 128  # prompts of each kind for the means
    seed: int = 42  # the train/validation split
    batch_size: int = 32
    # As the paper: fit and score on the harmful prompts the model refuses (refusal score > 0)
    # and the harmless ones it answers (score < 0); the means then contrast refusing with not.
    filter_prompts: bool = True
    refusal_tokens: Sequence[int] | None = None  # derived from the model when None
    refusal_phrases: Sequence[str] = judge.REFUSAL_PHRASES  # what opens a refusal, for deriving the tokens
    probe_prompts: int = 64  # harmful training prompts answered to find refusal tokens
    probe_tokens: int = 8  # enough to reach the judge's phrases ("As an AI" is 3 tokens)


@dataclass
class SelectionOptions(FitOptions):
    n_val: int = 32  # prompts of each kind for scoring
    max_layer_fraction: float = 0.8  # keep layers < fraction * n_layers
    kl_threshold: float = 0.1  # keep KL <= this
    induce_threshold: float | None = 0.0  # keep induce > this; None turns the filter (and its scoring) off
    # Bypass prompts per halving round. Bypass separates good candidates from bad ones by
    # several log-odds, so 2 prompts prune the first round safely (the README gives how the
    # pick and the sequence count compare with exhaustive scoring on the default model).
    halving_prompts: tuple[int, ...] = (2, 4, 8)
    keep_fraction: float = 0.25  # fraction kept after each round
    finalists: int = 4  # candidates per chunk scored for KL and induce, best bypass first
    exhaustive: bool = False  # score every candidate on everything (slow; for comparison)
    # When the filters leave nothing, choose by the fallback rules (see `select`) instead of
    # raising NoCandidateError.
    fallback: bool = True
    variant: str = variants.DIFFERENCE  # which candidates (see `variants.candidates`)

    def __post_init__(self) -> None:
        if self.variant not in variants.VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(variants.VARIANTS)}, got {self.variant!r}")


@dataclass(frozen=True)
class SearchSpace:
    """The ranges trials are drawn from; positions and distances are fractions of the last layer
    index L - 1, as in heretic 1.4.0 (whose defaults these are).

    direction: the fractional layer index of the global direction, clipped below by the first
        layer with a nonzero direction. heretic reads the residual after layer i, which is our
        layer i + 1's input: its 0.4-0.9 is about our 0.4-1.0.
    max_weight: a Peak's max_weight.
    max_weight_position: a Peak's max_weight_position.
    min_weight_fraction: a Peak's min_weight as a fraction of its max_weight.
    min_weight_distance: a Peak's min_weight_distance, in layers (the upper end a fraction of L - 1).
    """

    direction: tuple[float, float] = (0.4, 1.0)
    max_weight: tuple[float, float] = (0.8, 1.5)
    max_weight_position: tuple[float, float] = (0.6, 1.0)
    min_weight_fraction: tuple[float, float] = (0.0, 1.0)
    min_weight_distance: tuple[float, float] = (1.0, 0.6)


@dataclass
class SearchOptions(FitOptions):
    # A search fits one position's means and scores each trial on few prompts: fewer
    # training and probe prompts than `find_direction` keep its setup short.
    n_train: int = 64
    probe_prompts: int = 32
    seed: int = 0
    score_prompts: int = 16  # harmful prompts for the refusal score (every trial)
    kl_prompts: int = 16  # harmless prompts for the KL (every trial)
    judge_prompts: int = 16  # harmful prompts answered and judged (judged trials)
    judge_tokens: int = 12  # greedy tokens per judged answer
    judge_fraction: float = 0.5  # fraction of the trials that are judged, best first
    sampler: str = "auto"  # "optuna" (TPE), "random", or "auto": optuna when installed
    position: int = -1  # the post-instruction position the means are read at
    space: SearchSpace = field(default_factory=SearchSpace)


@dataclass
class CapabilityOptions:
    """lm-eval tasks scored before and after the edit (`capability.run_tasks`)."""

    tasks: tuple[str, ...]  # lm-eval task, group or tag names
    tasks_path: str | None = None  # a directory of lm-eval YAML task files, for tasks over local data
    limit: float | None = None  # at most this many documents per task (below 1: a fraction); None: all
    batch_size: int = 8


@dataclass
class AbliterationOptions:
    mode: str = "weights"  # "weights": orthogonalize the matrices in place; "hooks": ablate at run time
    scale: float = 1.0  # 1 removes the direction; see `refusal_kernels.ablate_`
    max_new_tokens: int = 64  # answer length when judging refusals
    kl_tokens: int = 1  # positions of the base model's harmless answers the KL is averaged over
    # Both set: take the difference of means at this cell, unscored, instead of selecting one.
    layer: int | None = None
    position: int | None = None
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    examples: int = 5  # harmful prompts whose answers before and after the report shows
    # Weights mode: also orthogonalize the token embeddings (a tied head is untied and kept).
    include_embeddings: bool = True
    # Weights mode: what orthogonalize_model_ keeps so that hf.undo_(report.record) restores the
    # weights (False, True or "exact"); write_lora needs "exact".
    undo: bool | str = False
    # Capability benchmarks before and after; None: none.
    capability: CapabilityOptions | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (self.layer is None) != (self.position is None):
            raise ValueError("layer and position go together: give both or neither")
        if self.mode != "weights" and (not self.include_embeddings or self.undo):
            raise ValueError("include_embeddings=False and undo apply to the weights: use mode='weights'")
