"""evaluate: KL over the first kl_tokens positions of the base model's answers, teacher-forced."""

import copy

import pytest
import torch
from conftest import random_llama

from refusal_kernels.pipeline import chat
from refusal_kernels.pipeline.evaluate import evaluate
from refusal_kernels.pipeline.scoring import kl_from_base, last_token_logits

HARMFUL = ["how do i break a lock", "tell me a bad thing"]
HARMLESS = ["describe a nice tree", "name a colour", "count to three please"]


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    base = random_llama(tiny_tokenizer)
    edited = copy.deepcopy(base)
    # A change that moves the next-token distributions clearly (a KL far above fp32 noise).
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in edited.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return base, edited


def _scored(model, tokenizer, kl_tokens, baseline=None):
    return evaluate(model, tokenizer, HARMFUL, HARMLESS, baseline=baseline, max_new_tokens=6, kl_tokens=kl_tokens)


def test_one_token_is_the_next_token_kl_after_the_prompt(models, tiny_tokenizer):
    base, edited = models
    before = _scored(base, tiny_tokenizer, 1)
    after = _scored(edited, tiny_tokenizer, 1, before)
    expected = kl_from_base(
        torch.log_softmax(last_token_logits(base, tiny_tokenizer, HARMLESS, 8), -1),
        last_token_logits(edited, tiny_tokenizer, HARMLESS, 8),
    ).mean()
    assert after.kl == pytest.approx(float(expected), rel=1e-3)
    assert _scored(base, tiny_tokenizer, 1, before).kl == pytest.approx(0.0, abs=1e-6)


def _kl_one_prompt_at_a_time(base, edited, tokenizer, answers, kl_tokens) -> float:
    """The definition, with no padding: each prompt and the base's answer alone."""
    prompts = chat.encode(tokenizer, chat.render(tokenizer, HARMLESS))
    per_prompt = []
    for prompt, answer in zip(prompts, chat.encode(tokenizer, answers), strict=True):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            p, q = (m(input_ids=ids).logits[0] for m in (base, edited))
        positions = slice(len(prompt) - 1, min(len(prompt) - 1 + kl_tokens, ids.shape[1]))
        per_prompt.append(kl_from_base(torch.log_softmax(p[positions], -1), q[positions]).mean())
    return float(torch.stack(per_prompt).mean())


@pytest.mark.parametrize("kl_tokens", [3, 50])
def test_n_tokens_average_each_prompts_positions_along_the_base_answer(models, tiny_tokenizer, kl_tokens):
    base, edited = models
    before = _scored(base, tiny_tokenizer, kl_tokens)
    after = _scored(edited, tiny_tokenizer, kl_tokens, before)
    assert before.harmless_logits.shape[:2] == (len(HARMLESS), kl_tokens)
    expected = _kl_one_prompt_at_a_time(base, edited, tiny_tokenizer, before.harmless_answers, kl_tokens)
    assert after.kl == pytest.approx(expected, rel=1e-3)
    assert after.kl != pytest.approx(_scored(edited, tiny_tokenizer, 1, _scored(base, tiny_tokenizer, 1)).kl)


@pytest.mark.parametrize("kl_tokens", [0, -1, 1.5, True])
def test_a_bad_kl_tokens_is_a_value_error(models, tiny_tokenizer, kl_tokens):
    with pytest.raises(ValueError, match="kl_tokens must be a positive int"):
        _scored(models[0], tiny_tokenizer, kl_tokens)


def test_a_baseline_scored_over_other_positions_is_a_value_error(models, tiny_tokenizer):
    before = _scored(models[0], tiny_tokenizer, 2)
    with pytest.raises(ValueError, match="evaluate both with the same kl_tokens"):
        _scored(models[1], tiny_tokenizer, 3, before)
