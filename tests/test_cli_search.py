"""`refusal-kernels search`, then `abliterate --trial DIR:N`; and the bad inputs of --trial."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import expect_error, prompt_files  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM

from refusal_kernels import cli
from refusal_kernels.pipeline.search import SearchResult


@pytest.fixture(scope="module")
def demo_prompts(tmp_path_factory):
    """A few of the demo model's own prompts as files, so that evaluation stays short."""
    from refusal_kernels.models import tiny_demo_path

    sets = json.loads((tiny_demo_path() / "eval_prompts.json").read_text())
    folder = tmp_path_factory.mktemp("prompts")
    for kind in ("harmful", "harmless"):
        (folder / f"{kind}.json").write_text(json.dumps(sets[f"{kind}_train"][:48]))
    return ["--harmful", str(folder / "harmful.json"), "--harmless", str(folder / "harmless.json"), "--n-val", "16"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, demo_prompts):
    out = tmp_path_factory.mktemp("search") / "out"
    argv = ["search", "--model", "tiny-demo", "--out", str(out), "--trials", "4", "--sampler", "random"]
    assert cli.main([*argv, *demo_prompts, "--judge-tokens", "8"]) == 0
    return out


def test_search_writes_the_front_and_abliterate_applies_a_trial(searched, demo_prompts, tmp_path):
    assert {p.name for p in searched.iterdir()} == {"search.json", "means.pt", "pareto.md", "pareto.png"}
    result = SearchResult.load(searched)
    assert len(result.trials) == 4 and result.pareto_front()
    number = result.pareto_front()[0]
    out = tmp_path / "model"
    argv = ["abliterate", "--model", "tiny-demo", "--trial", f"{searched}:{number}", "--out", str(out)]
    assert cli.main([*argv, *demo_prompts, "--max-new-tokens", "8"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["trial"]["number"] == number
    assert report["trial"]["norm_preserving"] == result.trial(number).params.norm_preserving
    # The saved weights are the trial's edit.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    expected, _ = _edited_demo(result, number)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)


def _edited_demo(result, number):
    from refusal_kernels import hf
    from refusal_kernels.models import tiny_demo_path

    model, tokenizer = hf.load_model(str(tiny_demo_path()))
    result.apply(model, number)
    return model.state_dict(), tokenizer


def test_bad_trials_give_one_line_and_write_nothing(searched, model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["abliterate", "--model", "tiny-demo", "--out", str(out)]
    expect_error([*base, "--trial", f"{searched}:99"], capsys, "trial 99 does not exist")
    expect_error([*base, "--trial", str(searched)], capsys, "expected DIR_OR_FILE:N")
    expect_error([*base, "--trial", f"{tmp_path / 'missing'}:0"], capsys, "cannot read a search")
    expect_error([*base, "--trial", f"{searched}:0", "--mode", "hooks"], capsys, "use --mode weights")
    other = ["abliterate", "--model", str(model_dir), "--out", str(out), "--trial", f"{searched}:0"]
    expect_error(other, capsys, "the search was run on a model with 4 layers")
    assert not out.exists()
