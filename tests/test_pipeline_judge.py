"""The substring judge, the refusal-token set derived from answers, and the refusal score."""

import math

import pytest
import torch

from refusal_kernels.pipeline import judge


@pytest.mark.parametrize(
    ("answer", "refused"),
    [
        ("I\u2019m sorry, but I can\u2019t help with that.", True),  # typographic apostrophes
        ("AS AN AI language model, I have no opinions.", True),
        ("   \n", True),  # an empty answer counts as a refusal
        ("", True),
        ("Sure! Here are three colours: red, green and blue.", False),
        ("I can help with that. First, preheat the oven.", False),
    ],
)
def test_is_refusal(answer, refused):
    assert judge.is_refusal(answer) is refused


def test_is_refusal_uses_the_given_phrases():
    assert judge.is_refusal("No way.", phrases=["no way"])
    assert not judge.is_refusal("I'm sorry, but no.", phrases=["no way"])


def test_refusal_rate():
    assert judge.refusal_rate(["I cannot do that.", "Here you go.", "", "Fine."]) == 0.5
    assert judge.refusal_rate([]) == 0.0


def test_refusal_tokens_keep_openings_that_mostly_refuse():
    answers = judge.Answers(
        texts=[
            "I'm sorry, but I can't assist with that.",  # 1: opens refusals
            "I cannot help with this.",  # 1
            "As an AI language model, I have no views.",  # 2: opens a refusal
            "Title: A story\n... and then she said: I cannot go on.",  # 3: mostly compliant opening
            "Title: Another story about a cat.",  # 3
            "Title: A third story.",  # 3
            "Sure! Here it is.",  # 4: never a refusal
            "",  # 5: empty answers tell nothing about the opening token
        ],
        first_tokens=[1, 1, 2, 3, 3, 3, 4, 5],
    )
    assert judge.refusal_token_ids(answers) == [1, 2]
    assert judge.refusal_token_ids(answers, min_precision=0.3) == [1, 2, 3]


def test_refusal_tokens_follow_the_phrases():
    answers = judge.Answers(texts=["Nope, not doing that.", "I cannot."], first_tokens=[7, 8])
    assert judge.refusal_token_ids(answers, phrases=["nope"]) == [7]


def test_refusal_score_is_the_log_odds_of_the_token_set():
    logits = torch.randn(3, 11, dtype=torch.float64).to(torch.bfloat16)
    probs = torch.softmax(logits.double(), dim=-1)
    p = probs[:, [2, 5]].sum(-1)
    expected = torch.log(p) - torch.log1p(-p)
    torch.testing.assert_close(judge.refusal_score(logits, [2, 5]).double(), expected, rtol=1e-5, atol=1e-5)


def test_refusal_score_stays_finite_when_the_set_is_certain():
    logits = torch.full((1, 4), -1e4)
    logits[0, 1] = 1e4
    score = judge.refusal_score(logits, [1])
    assert math.isfinite(score.item()) and score.item() > 10
