"""Per-layer scales: how strongly each layer's attention and MLP writers, and the embeddings, are edited.

`orthogonalize_model_` and `patch` take `scale=` as a number (every writer) or as a Schedule:
one scale per layer for the attention writers (the output projection and its bias), one per
layer for the MLP writers (down projections, experts, shared experts, their biases) and one
for the embeddings. A scale of 0 leaves its writers untouched.

`Schedule.peaked` builds heretic's shape (p-e-w/heretic, `AbliterationParameters`): for each
component a peak of `max_weight` at layer `max_weight_position` that falls linearly to
`min_weight` at `min_weight_distance` layers from it, with every layer farther away untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from .._checks import check_positive_int
from . import families


def _check_layer_count(n_layers: int) -> int:
    return check_positive_int("n_layers", n_layers)


@dataclass(frozen=True)
class Peak:
    """heretic's weight kernel for one component; `weight(i)` is layer i's scale.

    max_weight: the scale at the peak.
    max_weight_position: where the peak is, in layers; a fractional position lies between two.
    min_weight: the scale at min_weight_distance from the peak. heretic samples it as a
        fraction f of max_weight, which is Peak(w, p, f * w, d).
    min_weight_distance: how far from the peak a layer is still edited, in layers; > 0.

    Raises ValueError naming the field unless every field is a finite number and
    min_weight_distance > 0.
    """

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def __post_init__(self) -> None:
        for field in fields(self):
            value = families.check_scale(getattr(self, field.name), f"Peak.{field.name}")
            object.__setattr__(self, field.name, value)
        if self.min_weight_distance <= 0:
            raise ValueError(f"Peak.min_weight_distance must be > 0, got {self.min_weight_distance!r}")

    def weight(self, layer: int) -> float:
        """max_weight at the peak, linear down to min_weight at min_weight_distance, 0 beyond."""
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return 0.0
        return self.max_weight + (distance / self.min_weight_distance) * (self.min_weight - self.max_weight)


@dataclass(frozen=True)
class Schedule:
    """A scale per layer for the attention writers and for the MLP writers, and one for the embeddings.

    attention: layer i's attention writers are edited with attention[i]; one entry per layer.
    mlp: likewise for layer i's MLP writers.
    embeddings: the token (and learned position) embeddings' scale.

    Any sequence of numbers is accepted and stored as a tuple of floats. Raises ValueError
    naming the field unless every scale is a finite number and attention and mlp have the same
    length (TypeError if either is not a sequence); the length is checked against the model
    where the schedule is used.
    """

    attention: tuple[float, ...]
    mlp: tuple[float, ...]
    embeddings: float = 1.0

    def __post_init__(self) -> None:
        for name in ("attention", "mlp"):
            scales = getattr(self, name)
            if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
                raise TypeError(f"Schedule.{name} must be a sequence of numbers, one per layer, got {scales!r}")
            checked = tuple(families.check_scale(s, f"Schedule.{name}[{i}]") for i, s in enumerate(scales))
            object.__setattr__(self, name, checked)
        if len(self.attention) != len(self.mlp):
            raise ValueError(
                f"Schedule.attention has {len(self.attention)} scales and Schedule.mlp has {len(self.mlp)}: "
                "both need one per layer"
            )
        object.__setattr__(self, "embeddings", families.check_scale(self.embeddings, "Schedule.embeddings"))

    @classmethod
    def constant(cls, n_layers: int, scale: float) -> Schedule:
        """`scale` for every writer: the same edit as passing the number `scale`."""
        n_layers = _check_layer_count(n_layers)
        return cls((scale,) * n_layers, (scale,) * n_layers, scale)

    @classmethod
    def peaked(cls, n_layers: int, *, attention: Peak, mlp: Peak, embeddings: float = 0.0) -> Schedule:
        """heretic's shape: each component's scales follow its Peak; heretic leaves the embeddings alone.

        Args:
            n_layers: the model's number of decoder layers.
            attention: the attention writers' Peak.
            mlp: the MLP writers' Peak.
            embeddings: the embeddings' scale.

        Returns:
            The Schedule with attention[i] = attention.weight(i) and mlp[i] = mlp.weight(i).
        """
        n_layers = _check_layer_count(n_layers)
        for name, peak in (("attention", attention), ("mlp", mlp)):
            if not isinstance(peak, Peak):
                raise TypeError(f"{name} must be a Peak, got {type(peak).__name__}")
        layers = range(n_layers)
        return cls(tuple(attention.weight(i) for i in layers), tuple(mlp.weight(i) for i in layers), embeddings)

    def scale_of(self, writer: families.ResidualWriter) -> float:
        """The scale of one residual writer: by its component and layer."""
        if writer.component == families.EMBEDDING:
            return self.embeddings
        return (self.attention if writer.component == families.ATTENTION else self.mlp)[writer.layer]


def check_scale_or_schedule(scale: float | Schedule, n_layers: int) -> float | Schedule:
    """`scale` checked for a model of n_layers layers: a float, or a Schedule with one scale per layer.

    Raises ValueError naming what is wrong: a number that is not finite, or a schedule of
    another length.
    """
    if not isinstance(scale, Schedule):
        return families.check_scale(scale)
    if len(scale.attention) != n_layers:
        raise ValueError(
            f"Schedule.attention and Schedule.mlp have {len(scale.attention)} scales, the model has {n_layers} layers"
        )
    return scale
