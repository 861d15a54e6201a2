"""Direction variants: pure functions over the fp32 harmful and harmless means.

Every variant is built from the means `select.candidate_means` returns ([n_layers,
n_positions, d_model] float32, at each layer's input):

  difference     r = mean harmful - mean harmless (the paper's candidate)
  projected      r minus its component along the normalized harmless mean m at the same cell,
                 normalized: what distinguishes harmful prompts, not what every prompt has
  ensemble       the mean of the unit directions of neighbouring layers
  biprojected    one direction, measured at layer a, orthogonalized against the harmless mean
                 of each target layer b: one unit direction per layer
  interpolate    the direction at a fractional layer index, between two layers (heretic's
                 `direction_index`)
  per_layer      each layer's own unit direction

At layer 0 the post-instruction tokens are the same embeddings in every prompt, so the
difference of means there is exactly zero on real models. A zero vector has no direction: the
unit variants keep it zero (`candidates`), or borrow the nearest nonzero layer's (`per_layer`),
and `interpolate` refuses to use it.
"""

from __future__ import annotations

import math

import torch

DIFFERENCE = "difference"
PROJECTED = "projected"
ENSEMBLE = "ensemble"
VARIANTS = (DIFFERENCE, PROJECTED, ENSEMBLE)
# Below this norm (relative to the largest one) a direction counts as zero: float32 noise.
ZERO_FRACTION = 1e-6


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Each vector along the last dim divided by its norm, in fp32; zero vectors stay zero."""
    vectors = vectors.float()
    norms = vectors.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, vectors / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def nonzero(vectors: torch.Tensor) -> torch.Tensor:
    """Which vectors along the last dim have a direction: finite, with a norm above float32 noise."""
    norms = vectors.float().norm(dim=-1)
    largest = norms[torch.isfinite(norms)].max() if bool(torch.isfinite(norms).any()) else torch.tensor(0.0)
    return torch.isfinite(norms) & (norms > ZERO_FRACTION * largest)


def difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """r = mean harmful - mean harmless, fp32, same shape as the means."""
    return harmful.float() - harmless.float()


def projected(directions: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """r_perp = r - (r.m) m with m = normalize(harmless mean) of the same cell, then normalized.

    Args:
        directions: [..., d] (e.g. `difference` of the means).
        harmless: the harmless means, same shape.

    Returns:
        [..., d] fp32 unit vectors, orthogonal to their cell's harmless mean; zero where r is.
    """
    r, m = directions.float(), unit(harmless)
    return unit(r - (r * m).sum(-1, keepdim=True) * m)


def biprojected(direction: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """One direction orthogonalized against the harmless mean of each target layer.

    Args:
        direction: [d], measured at one layer a.
        harmless: [n_layers, d], the harmless means of the target layers b (one position).

    Returns:
        [n_layers, d] fp32: row b is normalize(r - (r.m_b) m_b) with m_b = normalize(harmless[b]).
    """
    return projected(direction.float().expand_as(harmless), harmless)


def layer_ensemble(directions: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """The mean of the unit directions of layers l - radius .. l + radius (those in range and nonzero).

    Args:
        directions: [n_layers, ..., d].
        radius: how many layers on each side; 0 gives the unit directions.

    Returns:
        [n_layers, ..., d] fp32 (a mean of unit vectors: its norm is at most 1); zero where every
        neighbour is zero.
    """
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    units = unit(directions)
    valid = nonzero(directions).unsqueeze(-1).float()
    n_layers = directions.shape[0]
    out = torch.zeros_like(units)
    for layer in range(n_layers):
        window = slice(max(0, layer - radius), min(n_layers, layer + radius + 1))
        count = valid[window].sum(0)
        out[layer] = (units[window] * valid[window]).sum(0) / count.clamp_min(1)
    return out


def interpolate(directions: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at a fractional layer index: normalize(lerp(u[floor], u[floor + 1], frac)).

    Args:
        directions: [n_layers, ..., d]; u are their unit vectors.
        index: in [0, n_layers - 1]; an integer gives that layer's unit direction.

    Returns:
        [..., d] fp32 unit vector(s).

    Raises:
        ValueError: index out of range or not finite, or a layer it uses has a zero direction,
            or the two directions cancel.
    """
    n_layers = directions.shape[0]
    if isinstance(index, bool) or not isinstance(index, (int, float)) or not 0 <= index <= n_layers - 1:
        raise ValueError(f"index must be a number in [0, {n_layers - 1}], got {index!r}")
    low = min(math.floor(index), n_layers - 1)
    high = min(low + 1, n_layers - 1)
    fraction = float(index) - low
    valid = nonzero(directions)
    for layer in sorted({low, high} if fraction > 0 else {low}):
        if not bool(valid[layer].all()):
            raise ValueError(f"index {index}: layer {layer}'s direction is zero (layer 0's always is)")
    units = unit(directions)
    mixed = torch.lerp(units[low], units[high], fraction)
    if bool((mixed.norm(dim=-1) <= ZERO_FRACTION).any()):
        raise ValueError(f"index {index}: the directions of layers {low} and {high} cancel")
    return unit(mixed)


def per_layer(directions: torch.Tensor) -> torch.Tensor:
    """Each layer's unit direction, [n_layers, d]; a zero layer takes the nearest nonzero layer's.

    Args:
        directions: [n_layers, d].

    Raises:
        ValueError: every layer's direction is zero.
    """
    valid = nonzero(directions).tolist()
    useful = [layer for layer, ok in enumerate(valid) if ok]
    if not useful:
        raise ValueError("every layer's direction is zero")
    units = unit(directions)
    # Ties go to the later layer: a zero layer 0 borrows layer 1's direction.
    nearest = [min(useful, key=lambda u, layer=layer: (abs(u - layer), -u)) for layer in range(len(valid))]
    return units[nearest]


def first_useful_layer(directions: torch.Tensor) -> int:
    """The first layer whose direction is not zero (all positions), e.g. 1 on real models.

    Raises:
        ValueError: no layer has one.
    """
    valid = nonzero(directions).reshape(directions.shape[0], -1).all(-1).tolist()
    if not any(valid):
        raise ValueError("every layer's direction is zero")
    return valid.index(True)


def candidates(harmful: torch.Tensor, harmless: torch.Tensor, variant: str = DIFFERENCE) -> torch.Tensor:
    """The candidate r(l, p) of every cell for one variant, [n_layers, n_positions, d] fp32.

    Args:
        harmful, harmless: the means, [n_layers, n_positions, d].
        variant: DIFFERENCE (raw difference of means), PROJECTED (unit, orthogonal to the
            cell's harmless mean) or ENSEMBLE (mean of the unit differences of layers l-1..l+1).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    directions = difference(harmful, harmless)
    # Zero cells stay exactly zero, so the pipeline's zero filter sees them.
    directions = torch.where(nonzero(directions).unsqueeze(-1), directions, 0.0)
    if variant == PROJECTED:
        return projected(directions, harmless)
    if variant == ENSEMBLE:
        return layer_ensemble(directions)
    return directions
