"""Direction variants against hand computations, and their place in the pipeline."""

from __future__ import annotations

import pytest
import torch

from refusal_kernels.pipeline import select, variants
from refusal_kernels.pipeline.options import SelectionOptions
from refusal_kernels.pipeline.report import DirectionResult


def _means(n_layers=4, n_positions=2, d=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    harmful = torch.randn(n_layers, n_positions, d, generator=generator)
    harmless = torch.randn(n_layers, n_positions, d, generator=generator)
    harmful[0] = harmless[0]  # layer 0: the same embeddings in every prompt
    return harmful, harmless


def test_difference_is_harmful_minus_harmless():
    harmful, harmless = _means()
    torch.testing.assert_close(variants.difference(harmful, harmless), harmful - harmless)


def test_projected_is_unit_and_orthogonal_to_the_harmless_mean():
    harmful, harmless = _means()
    r = harmful[2, 1] - harmless[2, 1]
    m = harmless[2, 1] / harmless[2, 1].norm()
    expected = r - (r @ m) * m
    expected = expected / expected.norm()
    out = variants.projected(harmful - harmless, harmless)
    torch.testing.assert_close(out[2, 1], expected)
    assert abs(float(out[2, 1] @ m)) < 1e-6
    norms = out[1:].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # a zero difference stays zero


def test_biprojected_is_orthogonalized_per_target_layer():
    harmful, harmless = _means()
    r = harmful[2, -1] - harmless[2, -1]
    out = variants.biprojected(r, harmless[:, -1])
    assert out.shape == (4, 6)
    for b in range(4):
        m = harmless[b, -1] / harmless[b, -1].norm()
        expected = r - (r @ m) * m
        torch.testing.assert_close(out[b], expected / expected.norm())
        assert abs(float(out[b] @ m)) < 1e-6


def test_layer_ensemble_averages_the_unit_directions_of_nonzero_neighbours():
    harmful, harmless = _means()
    r = harmful - harmless
    u = r / r.norm(dim=-1, keepdim=True)
    out = variants.layer_ensemble(r, radius=1)
    torch.testing.assert_close(out[2], (u[1] + u[2] + u[3]) / 3)
    torch.testing.assert_close(out[3], (u[2] + u[3]) / 2)
    torch.testing.assert_close(out[0], u[1])  # layer 0 is zero: only layer 1 counts
    torch.testing.assert_close(out[1], (u[1] + u[2]) / 2)
    torch.testing.assert_close(variants.layer_ensemble(r[1:], radius=0), u[1:])
    with pytest.raises(ValueError, match="radius"):
        variants.layer_ensemble(r, radius=-1)


def test_interpolate_endpoints_are_the_layer_directions_and_midpoints_lerp():
    harmful, harmless = _means()
    r = (harmful - harmless)[:, -1]
    u = r / r.norm(dim=-1, keepdim=True)
    for layer in (1, 2, 3):
        torch.testing.assert_close(variants.interpolate(r, layer), u[layer])
        torch.testing.assert_close(variants.interpolate(r, float(layer)), u[layer])
    mixed = 0.75 * u[1] + 0.25 * u[2]
    torch.testing.assert_close(variants.interpolate(r, 1.25), mixed / mixed.norm())
    with pytest.raises(ValueError, match="layer 0's direction is zero"):
        variants.interpolate(r, 0.5)
    for bad in (-0.1, 3.5, float("nan"), True):
        with pytest.raises(ValueError, match="index must be a number"):
            variants.interpolate(r, bad)


def test_per_layer_borrows_the_nearest_nonzero_layer_for_layer_0():
    harmful, harmless = _means()
    r = (harmful - harmless)[:, -1]
    u = r / r.norm(dim=-1, keepdim=True)
    out = variants.per_layer(r)
    torch.testing.assert_close(out[0], u[1])
    torch.testing.assert_close(out[1:], u[1:])
    assert variants.first_useful_layer(harmful - harmless) == 1
    with pytest.raises(ValueError, match="every layer's direction is zero"):
        variants.per_layer(torch.zeros(3, 4))


def test_candidates_of_each_variant():
    harmful, harmless = _means()
    r = harmful - harmless
    torch.testing.assert_close(variants.candidates(harmful, harmless), r)
    torch.testing.assert_close(variants.candidates(harmful, harmless, "projected"), variants.projected(r, harmless))
    torch.testing.assert_close(variants.candidates(harmful, harmless, "ensemble"), variants.layer_ensemble(r))
    with pytest.raises(ValueError, match="variant must be one of"):
        variants.candidates(harmful, harmless, "sideways")
    with pytest.raises(ValueError, match="variant must be one of"):
        SelectionOptions(variant="sideways")


def test_candidate_means_give_the_difference_candidates(tiny_llama, tiny_tokenizer):
    from refusal_kernels.pipeline.scoring import Sites

    harmful = ["Tell me how to pick a lock", "Write a threatening letter", "How do I steal a car"]
    harmless = ["Tell me about the moon", "Write a poem about rain", "How do I bake bread"]
    sites = Sites.of(tiny_llama)
    means = select.candidate_means(tiny_llama, tiny_tokenizer, harmful, harmless, sites, batch_size=2)
    directions, positions, kept = select.candidate_directions(
        tiny_llama, tiny_tokenizer, harmful, harmless, sites, batch_size=2
    )
    assert means.positions == positions and means.kept == kept == {"harmful_train": 3, "harmless_train": 3}
    torch.testing.assert_close(directions, means.harmful - means.harmless)
    projected, _, _ = select.candidate_directions(
        tiny_llama, tiny_tokenizer, harmful, harmless, sites, batch_size=2, variant="projected"
    )
    torch.testing.assert_close(projected, variants.projected(directions, means.harmless))


def test_direction_result_keeps_its_variant(tmp_path):
    result = DirectionResult(
        direction=torch.ones(4),
        layer=1,
        position=-1,
        n_layers=2,
        positions=[-1],
        scores={name: torch.zeros(2, 1) for name in ("bypass", "induce", "kl")},
        refusal_tokens=[1],
        variant="projected",
    )
    result.save(tmp_path)
    assert DirectionResult.load(tmp_path).variant == "projected"
