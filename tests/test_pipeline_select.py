"""Selection: filters, error messages, pass counts, and halving against exhaustive scoring."""

import pytest
import torch
from test_pipeline_scoring import PROMPTS, REFUSAL_TOKENS, llama_sites

from refusal_kernels.pipeline import judge, select
from refusal_kernels.pipeline.options import SelectionOptions
from refusal_kernels.pipeline.report import DirectionResult
from refusal_kernels.pipeline.scoring import last_token_logits
from refusal_kernels.pipeline.select import NoCandidateError, find_direction

HARMFUL = [f"how do i break thing {i}" for i in range(6)]
HARMLESS = [f"please describe nice thing {i}" for i in range(6)]


def run(model, tokenizer, **options):
    # The random model's refusal scores mean nothing, so by default every prompt is used.
    options = {"refusal_tokens": REFUSAL_TOKENS, "filter_prompts": False, **options}
    return find_direction(
        model,
        tokenizer,
        HARMFUL,
        HARMLESS,
        sites=llama_sites(model),
        harmful_val=PROMPTS[:3],
        harmless_val=PROMPTS[3:],
        batch_size=8,
        **options,
    )


def refusal_scores(model, tokenizer, prompts, tokens):
    return judge.refusal_score(last_token_logits(model, tokenizer, prompts, batch_size=8), tokens)


def test_filter_keeps_refused_harmful_and_answered_harmless_prompts(tiny_llama, tiny_tokenizer):
    # "Refusal tokens" for the random model: the fewest of those likelier after HARMFUL than
    # after HARMLESS that make at least one harmful prompt score > 0 and one harmless < 0.
    harmful_logits = last_token_logits(tiny_llama, tiny_tokenizer, HARMFUL, batch_size=8)
    harmless_logits = last_token_logits(tiny_llama, tiny_tokenizer, HARMLESS, batch_size=8)
    ratio = torch.softmax(harmful_logits, -1).mean(0) / torch.softmax(harmless_logits, -1).mean(0)
    ranked = ratio.argsort(descending=True).tolist()
    tokens = next(
        ranked[:k]
        for k in range(1, len(ranked))
        if (judge.refusal_score(harmful_logits, ranked[:k]) > 0).any()
        and (judge.refusal_score(harmless_logits, ranked[:k]) < 0).any()
    )
    result = run(
        tiny_llama, tiny_tokenizer, refusal_tokens=tokens, filter_prompts=True, kl_threshold=10.0, induce_threshold=None
    )
    expected = {
        "harmful_train": int((refusal_scores(tiny_llama, tiny_tokenizer, HARMFUL, tokens) > 0).sum()),
        "harmless_train": int((refusal_scores(tiny_llama, tiny_tokenizer, HARMLESS, tokens) < 0).sum()),
        "harmful_val": int((refusal_scores(tiny_llama, tiny_tokenizer, PROMPTS[:3], tokens) > 0).sum()),
        "harmless_val": int((refusal_scores(tiny_llama, tiny_tokenizer, PROMPTS[3:], tokens) < 0).sum()),
    }
    assert result.prompts == expected


def test_filter_that_keeps_nothing_says_so(tiny_llama, tiny_tokenizer):
    with pytest.raises(NoCandidateError, match=r"kept none of the 6 instructions.*filter_prompts=False"):
        run(tiny_llama, tiny_tokenizer, refusal_tokens=[0], filter_prompts=True)  # <pad>: never likely


def test_selected_candidate_passes_the_filters(tiny_llama, tiny_tokenizer):
    result = run(tiny_llama, tiny_tokenizer, kl_threshold=10.0, induce_threshold=-1e9, max_layer_fraction=0.5)
    assert result.layer < 0.5 * result.n_layers
    assert result.score("kl") <= 10.0
    bypass = result.scores["bypass"]
    eligible_kl = result.scores["kl"] <= 10.0
    assert result.score("bypass") == pytest.approx(bypass[eligible_kl].min().item())
    n_positions = len(result.positions)
    assert result.filtered["layer"] == (result.n_layers - 2) * n_positions  # layers 2.. of 3
    assert result.filtered["zero"] == n_positions  # layer 0: identical template embeddings
    assert result.layer == 1
    assert result.rule == "filters"


def test_nothing_survives_says_which_filter_without_fallback(tiny_llama, tiny_tokenizer):
    with pytest.raises(NoCandidateError, match=r"for KL > -1\.0"):
        run(tiny_llama, tiny_tokenizer, kl_threshold=-1.0, fallback=False)


def test_induce_relaxed_when_nothing_induces(tiny_llama, tiny_tokenizer):
    result = run(tiny_llama, tiny_tokenizer, kl_threshold=10.0, induce_threshold=1e9, exhaustive=True)
    assert result.rule == "kl_only"
    within_kl = result.scores["kl"] <= 10.0
    assert result.score("bypass") == pytest.approx(result.scores["bypass"][within_kl].min().item())
    assert result.filtered["induce"] > 0


def test_kl_band_when_nothing_is_within_the_kl_bound(tiny_llama, tiny_tokenizer):
    result = run(tiny_llama, tiny_tokenizer, kl_threshold=-1.0, exhaustive=True)
    assert result.rule == "kl_band"
    kl, bypass = result.scores["kl"], result.scores["bypass"]
    in_band = kl <= select.KL_BAND * kl.nan_to_num(float("inf")).min()
    assert result.score("kl") <= select.KL_BAND * kl.nan_to_num(float("inf")).min().item()
    assert result.score("bypass") == pytest.approx(bypass[in_band].min().item())


def test_kl_band_takes_the_best_bypass_within_twice_the_lowest_kl():
    scoring = select._Scoring(None, torch.ones(2, 2, 4), None, SelectionOptions(max_layer_fraction=1.0))
    scoring.scores["kl"] = torch.tensor([[0.5, 0.9], [1.1, 3.0]])
    scoring.scores["bypass"] = torch.tensor([[2.0, 1.0], [-1.0, -5.0]])
    assert scoring.fallback([]) == ([(2.0, 0, 0), (1.0, 0, 1)], "kl_band")
    assert scoring.fallback([(1, 1)]) == ([(-5.0, 1, 1)], "kl_only")
    scoring.scores["kl"][:] = float("nan")
    assert scoring.fallback([]) == ([], "kl_band")  # nothing scored: no candidate to fall back on


def test_halving_uses_fewer_passes_than_exhaustive(tiny_llama, tiny_tokenizer):
    halving = run(
        tiny_llama, tiny_tokenizer, kl_threshold=10.0, induce_threshold=-1e9, halving_prompts=(1,), finalists=1
    )
    exhaustive = run(tiny_llama, tiny_tokenizer, kl_threshold=10.0, induce_threshold=-1e9, exhaustive=True)
    assert halving.forward_passes["exhaustive"] == exhaustive.forward_passes["used"]
    assert halving.forward_passes["used"] < exhaustive.forward_passes["used"]
    assert not torch.isnan(exhaustive.scores["kl"][1 : int(0.8 * exhaustive.n_layers) + 1]).any()  # all but layer 0


def test_result_round_trips_through_files(tiny_llama, tiny_tokenizer, tmp_path):
    result = run(tiny_llama, tiny_tokenizer, kl_threshold=10.0, induce_threshold=-1e9)
    result.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"direction.pt", "direction.json", "heatmaps.png"}
    loaded = DirectionResult.load(tmp_path)
    assert torch.equal(loaded.direction, result.direction)
    assert (loaded.layer, loaded.position, loaded.refusal_tokens, loaded.rule) == (
        result.layer,
        result.position,
        result.refusal_tokens,
        result.rule,
    )
    assert (tmp_path / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
