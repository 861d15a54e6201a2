"""The search over directions, schedules, norm preservation and projection, on the tiny demo model."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import refusal_kernels
from refusal_kernels import hf
from refusal_kernels.hf import Peak
from refusal_kernels.models import tiny_demo_path
from refusal_kernels.pipeline import search as search_module
from refusal_kernels.pipeline.search import SearchResult, TrialParams, pareto_front, pareto_ranks, trial_direction

pytest.importorskip("transformers")

TRIALS = 8


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(2)
    model, tokenizer = hf.load_model(str(tiny_demo_path()))
    sets = json.loads((tiny_demo_path() / "eval_prompts.json").read_text())
    return model, tokenizer, sets


def _search(demo, **options):
    model, tokenizer, sets = demo
    return refusal_kernels.search(
        model,
        tokenizer,
        sets["harmful_train"],
        sets["harmless_train"],
        harmful_val=sets["harmful_heldout"],
        harmless_val=sets["harmless_heldout"],
        trials=TRIALS,
        **options,
    )


@pytest.fixture(scope="module")
def random_search(demo):
    model = demo[0]
    original = {name: t.clone() for name, t in model.state_dict().items()}
    result = _search(demo, sampler="random")
    return result, original


def _assert_restored(model, original):
    # Every trial was undone: fp32 weights within a few 2^-24 of the removed component.
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=1e-6, atol=1e-6, msg=name)


def test_random_search_finds_fewer_refusals_at_low_kl_and_restores_the_weights(demo, random_search):
    result, original = random_search
    assert result.sampler == "random" and len(result.trials) == TRIALS
    assert result.baseline["refusals"] == result.prompts["judge"] == 16
    front = [result.trial(n) for n in result.pareto_front()]
    best = min(front, key=lambda t: t.refusals)
    assert best.refusals < result.baseline["refusals"] // 2
    assert best.kl < 0.1
    judged = [t for t in result.trials if t.refusals is not None]
    assert len(judged) == TRIALS // 2  # judge_fraction 0.5
    assert result.timings["total"] < 60
    _assert_restored(demo[0], original)


def test_a_trial_is_applied_again_reversibly(demo, random_search):
    model = demo[0]
    result, original = random_search
    number = result.pareto_front()[0]
    record = result.apply(model, number, undo=True)
    assert record.norm_preserving == result.trial(number).params.norm_preserving
    hf.undo_(record)
    _assert_restored(model, original)


def test_search_result_saves_and_loads(tmp_path, random_search):
    result, _ = random_search
    result.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"search.json", "means.pt", "pareto.md", "pareto.png"}
    loaded = SearchResult.load(tmp_path / "search.json")
    assert loaded.pareto_front() == result.pareto_front()
    assert loaded.pareto_table() == result.pareto_table() == (tmp_path / "pareto.md").read_text()
    assert [t.params for t in loaded.trials] == [t.params for t in result.trials]
    for number in result.pareto_front():
        torch.testing.assert_close(loaded.direction(number), result.direction(number))
    with pytest.raises(ValueError, match="trial 99 does not exist"):
        loaded.trial(99)


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna is not installed (extra 'search')")
def test_optuna_search_runs_and_restores_the_weights(demo):
    model = demo[0]
    original = {name: t.clone() for name, t in model.state_dict().items()}
    result = _search(demo, sampler="optuna", seed=1)
    assert result.sampler == "optuna" and len(result.trials) == TRIALS
    assert all(t.refusals is None or 0 <= t.refusals <= 16 for t in result.trials)
    _assert_restored(model, original)


def test_pareto_front_and_ranks_on_synthetic_metrics():
    points = [(3, 0.1), (1, 0.5), (2, 0.2), (3, 0.3), (1, 0.5), (0, 0.9), (2, 0.05)]
    # (3, 0.1) and (2, 0.2) lose to (2, 0.05), (3, 0.3) to (2, 0.2) too; the two (1, 0.5) tie and stay.
    assert pareto_front(points) == [1, 4, 5, 6]
    assert pareto_front(points[:1]) == [0]
    assert pareto_front([]) == []
    assert pareto_ranks(points) == [1, 0, 1, 2, 0, 0, 0]


def test_trial_directions_have_the_shape_of_their_variant():
    generator = torch.Generator().manual_seed(0)
    harmful, harmless = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    harmful[0] = harmless[0]
    peak = Peak(1.0, 2.0, 0.5, 1.0)

    def params(index, projected):
        return TrialParams(index, peak, peak, norm_preserving=False, projected=projected)

    assert trial_direction(params(1.5, False), harmful, harmless).shape == (8,)
    assert trial_direction(params(1.5, True), harmful, harmless).shape == (4, 8)
    per_layer = trial_direction(params(None, False), harmful, harmless)
    assert per_layer.shape == (4, 8)
    torch.testing.assert_close(per_layer[0], per_layer[1])  # layer 0 borrows layer 1's direction


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"trials": 0}, "trials"),
        ({"trials": 2, "judge_fraction": 0.0}, "judge_fraction"),
        ({"trials": 2, "sampler": "grid"}, "sampler"),
        ({"trials": 2, "position": 0}, "position"),
        ({"trials": 2, "score_prompts": 0}, "score_prompts"),
        ({"trials": 2, "position": -99}, "position"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(demo, options, name):
    model, tokenizer, sets = demo
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        search_module.search(model, tokenizer, sets["harmful_train"], sets["harmless_train"], **options)
