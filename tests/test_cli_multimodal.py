"""The command line on multimodal checkpoints: the language model is edited, the rest stays as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from test_cli import HARMFUL, HARMLESS, prompt_files  # noqa: F401  (fixture)
from tiny_configs import randomize_, tiny_config

from refusal_kernels import cli
from refusal_kernels.hf import describe_model
from refusal_kernels.pipeline.report import DirectionResult
from refusal_kernels.pipeline.search import search
from refusal_kernels.pipeline.select import find_direction

# LLaVA has no causal-LM class (it loads as image-text-to-text); Gemma 3's multimodal class is its causal-LM one.
CHECKPOINTS = {"llava": "LlavaForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}


@pytest.fixture(params=list(CHECKPOINTS))
def multimodal_dir(request, tmp_path, tiny_tokenizer):
    cls = getattr(transformers, CHECKPOINTS[request.param])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomize_(cls(tiny_config(request.param, cls)).float().eval())
    path = tmp_path / request.param
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path, cls


def _language_model_keys(state) -> set[str]:
    return {k for k in state if ".language_model." in k or k.startswith("language_model.")}


def test_abliterate_edits_only_the_language_model(multimodal_dir, prompt_files, tmp_path):  # noqa: F811
    path, cls = multimodal_dir
    source = cls.from_pretrained(path).state_dict()
    out = tmp_path / "out"
    argv = ["abliterate", "--model", str(path), "--out", str(out), *prompt_files, "--layer", "1", "--position", "-1"]
    assert cli.main([*argv, "--all-prompts", "--max-new-tokens", "4"]) == 0
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert type(reloaded) is cls
    state = reloaded.state_dict()
    edited = _language_model_keys(source)
    assert all(torch.equal(state[k], v) for k, v in source.items() if k not in edited and k != "lm_head.weight")
    assert any(not torch.equal(state[k], source[k]) for k in edited)
    if cls is transformers.LlavaForConditionalGeneration:  # no post-sublayer norm: the writer itself is orthogonal to r
        direction = DirectionResult.load(out).direction
        down = reloaded.model.language_model.layers[-1].mlp.down_proj.weight
        assert (direction / direction.norm() @ down).abs().max() < 1e-4


def test_find_direction_and_search_run_on_the_language_model(multimodal_dir):
    path, cls = multimodal_dir
    model, tokenizer = cls.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)
    # The random model refuses nothing: its refusal tokens are named, and no candidate is filtered out.
    common = {"refusal_tokens": [5, 6], "filter_prompts": False, "n_train": 8}
    result = find_direction(
        model, tokenizer, HARMFUL, HARMLESS, n_val=4, kl_threshold=1e9, induce_threshold=None, **common
    )
    assert result.direction.shape == (describe_model(model).hidden_size,)
    searched = search(model, tokenizer, HARMFUL, HARMLESS, trials=2, sampler="random", judge_tokens=4, **common)
    assert len(searched.trials) == 2
