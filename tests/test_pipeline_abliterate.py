"""The library's `abliterate`, on the shipped tiny demo model: the CLI's main job as one call."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import refusal_kernels as rk
from refusal_kernels import hf
from refusal_kernels.models import selection_preset, tiny_demo_path, tiny_demo_prompt_sets
from refusal_kernels.pipeline.abliterate import AbliterationOptions, SearchTrial

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(tiny_demo_path(), local_files_only=True)


@pytest.fixture
def model():
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_demo_path(), local_files_only=True).eval()


@pytest.fixture(scope="module")
def prompts():
    return tiny_demo_prompt_sets()


def options(**fields) -> AbliterationOptions:
    return AbliterationOptions(selection=rk.SelectionOptions(**selection_preset("tiny-demo")), **fields)


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(["hello there"], return_tensors="pt")).logits


def state(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_weights_mode_removes_the_refusals_and_the_report_saves_itself(model, tokenizer, prompts, tmp_path):
    report = rk.abliterate(model, tokenizer, prompts, options(), source="tiny-demo")
    assert report.before.harmful_refusal >= 0.5
    assert report.after.harmful_refusal < report.before.harmful_refusal / 2
    assert list(report.timings) == ["direction", "evaluate_before", "apply", "evaluate_after"]
    assert report.hooks is None
    # The weights are edited: the direction's component is gone from every output projection.
    unit = report.direction.direction / report.direction.direction.norm()
    down = model.model.layers[0].mlp.down_proj.weight
    assert (unit @ down).abs().max() < 1e-4 * down.abs().max()

    report.save(tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["model"] == "tiny-demo" and saved["mode"] == "weights" and len(saved["examples"]) == 5
    assert (tmp_path / "report.md").read_text().startswith("# Abliteration report: tiny-demo")
    assert {"direction.pt", "direction.json", "heatmaps.png"} <= {p.name for p in tmp_path.iterdir()}


def test_hooks_mode_leaves_the_weights_and_its_hooks_come_off(model, tokenizer, prompts):
    before_state, before_logits = state(model), logits(model, tokenizer)
    report = rk.abliterate(model, tokenizer, prompts, options(mode="hooks"))
    assert report.after.harmful_refusal < report.before.harmful_refusal
    assert all(torch.equal(t, before_state[name]) for name, t in model.state_dict().items())
    assert not torch.equal(logits(model, tokenizer), before_logits)
    report.hooks.remove()
    assert torch.equal(logits(model, tokenizer), before_logits)


def test_a_given_direction_at_a_given_scale_is_used_as_is(model, tokenizer, prompts):
    found = rk.find_direction(model, tokenizer, **dataclasses.asdict(prompts), **selection_preset("tiny-demo"))
    report = rk.abliterate(model, tokenizer, prompts, options(scale=0.0), direction=found)
    assert report.direction is found
    assert report.after.harmful_refusal == report.before.harmful_refusal  # scale 0 changes nothing


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"mode": "both"}, ValueError, "mode must be one of weights, hooks"),
        ({"layer": 1}, ValueError, "layer and position go together"),
        ({"mode": "hooks", "include_embeddings": False}, ValueError, "apply to the weights: use mode='weights'"),
        ({"mode": "hooks", "undo": "exact"}, ValueError, "apply to the weights: use mode='weights'"),
    ],
)
def test_bad_options_name_the_field(fields, error, message):
    with pytest.raises(error, match=message):
        AbliterationOptions(**fields)


def test_bad_inputs_leave_the_model_untouched(model, tokenizer, prompts):
    with pytest.raises(TypeError, match="prompts must be a PromptSets"):
        rk.abliterate(model, tokenizer, {"harmful": prompts.harmful}, options())
    with pytest.raises(TypeError, match="trial must be a SearchTrial"):
        rk.abliterate(model, tokenizer, prompts, options(), trial=("search-out", 3))
    searched = rk.search(model, tokenizer, **dataclasses.asdict(prompts), trials=2, sampler="random")
    unchanged = state(model)  # the search's undone trials leave rounding behind, so read after it
    with pytest.raises(ValueError, match="use mode='weights'"):
        rk.abliterate(model, tokenizer, prompts, options(mode="hooks"), trial=SearchTrial(searched, 0))
    with pytest.raises(ValueError, match="trial 7 does not exist"):
        SearchTrial(searched, 7)
    other = hf.load_model(str(tiny_demo_path()))[0]
    other.model.layers = other.model.layers[:2]
    other.config.num_hidden_layers = 2
    with pytest.raises(ValueError, match="the search was run on a model with 4 layers"):
        rk.abliterate(other, tokenizer, prompts, options(), trial=SearchTrial(searched, 0))
    assert all(torch.equal(t, unchanged[name]) for name, t in model.state_dict().items())


def test_write_lora_exports_from_the_unedited_weights_and_leaves_the_edit_bit_for_bit(
    model, tokenizer, prompts, tmp_path
):
    from peft import PeftModel

    report = rk.abliterate(model, tokenizer, prompts, options(include_embeddings=False, undo="exact"))
    edited = state(model)
    export = report.write_lora(model, tmp_path / "lora")
    assert all(torch.equal(t, edited[name]) for name, t in model.state_dict().items())
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_demo_path(), local_files_only=True).eval()
    adapted = PeftModel.from_pretrained(base, export.path)
    torch.testing.assert_close(logits(adapted, tokenizer), logits(model, tokenizer), atol=1e-5, rtol=1e-5)
    report.write_lora(model, tmp_path / "again")  # the record stays usable
    assert all(torch.equal(t, edited[name]) for name, t in model.state_dict().items())


def test_write_lora_needs_an_exact_record(model, tokenizer, prompts, tmp_path):
    report = rk.abliterate(model, tokenizer, prompts, options(include_embeddings=False))
    with pytest.raises(ValueError, match="undo='exact'"):
        report.write_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("norm_preserving", [True, False])
def test_a_norm_preserving_trial_has_no_rank_one_form(norm_preserving):
    from types import SimpleNamespace

    from refusal_kernels.pipeline.abliterate import check_rank_one

    params = SimpleNamespace(norm_preserving=norm_preserving)
    trial = SimpleNamespace(number=3, search=SimpleNamespace(trial=lambda number: SimpleNamespace(params=params)))
    if norm_preserving:
        with pytest.raises(ValueError, match="trial 3 is norm-preserving, which a LoRA adapter cannot express"):
            check_rank_one(trial, "a LoRA adapter")
    else:
        check_rank_one(trial, "a LoRA adapter")
    check_rank_one(None, "a LoRA adapter")
