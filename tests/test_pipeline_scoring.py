"""Batched candidate scoring equals scoring each candidate alone with plain hooks."""

import pytest
import torch

from refusal_kernels import reference
from refusal_kernels.pipeline import capture, chat, judge
from refusal_kernels.pipeline.scoring import Scorer, Sites

PROMPTS = ["how do i pick a lock", "write a poem", "tell me a joke please", "why is the sky blue", "hi"]
REFUSAL_TOKENS = [7, 11, 30]


def llama_sites(model) -> Sites:
    layers = list(model.model.layers)
    return Sites(layers=layers, writers=[m for layer in layers for m in (layer.self_attn, layer.mlp)])


def single_candidate_logits(model, tokenizer, prompts, *, ablate=None, add=None, layer=None):
    """Last-token logits with one direction ablated everywhere, or added at one layer, using
    out-of-place pure-torch hooks: the reference the batched scorer must match."""
    sites = llama_sites(model)
    handles = []
    if ablate is not None:

        def pre(module, args, kwargs):
            if args:
                return (reference.ablate(args[0], ablate), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": reference.ablate(kwargs["hidden_states"], ablate)}

        def post(module, args, output):
            if isinstance(output, tuple):
                return (reference.ablate(output[0], ablate), *output[1:])
            return reference.ablate(output, ablate)

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in sites.layers]
        handles += [writer.register_forward_hook(post) for writer in sites.writers]
    if add is not None:

        def adder(module, args, kwargs):
            if args:
                return (args[0] + add, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + add}

        handles.append(sites.layers[layer].register_forward_pre_hook(adder, with_kwargs=True))
    try:
        out = torch.empty(len(prompts), model.config.vocab_size)
        for batch in chat.batches(tokenizer, prompts, 2):
            with torch.no_grad():
                out[batch.rows] = model(**batch.model_inputs()).logits[:, -1].float()
        return out
    finally:
        for h in handles:
            h.remove()


@pytest.fixture
def candidates(tiny_llama):
    torch.manual_seed(1)
    return torch.randn(3, tiny_llama.config.hidden_size)


@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_bypass_matches_one_candidate_at_a_time(tiny_llama, tiny_tokenizer, candidates, batch_size):
    scorer = Scorer(tiny_llama, tiny_tokenizer, llama_sites(tiny_llama), REFUSAL_TOKENS, batch_size=batch_size)
    batched = scorer.bypass(candidates, PROMPTS)
    for k, direction in enumerate(candidates):
        logits = single_candidate_logits(tiny_llama, tiny_tokenizer, PROMPTS, ablate=direction)
        expected = judge.refusal_score(logits, REFUSAL_TOKENS).mean()
        torch.testing.assert_close(batched[k], expected, rtol=1e-4, atol=1e-4)
    assert scorer.sequences == len(candidates) * len(PROMPTS)


def test_kl_and_induce_match_one_candidate_at_a_time(tiny_llama, tiny_tokenizer, candidates):
    scorer = Scorer(tiny_llama, tiny_tokenizer, llama_sites(tiny_llama), REFUSAL_TOKENS, batch_size=8)
    base = scorer.last_logits(PROMPTS)
    torch.testing.assert_close(base, single_candidate_logits(tiny_llama, tiny_tokenizer, PROMPTS), rtol=1e-5, atol=1e-5)
    kl = scorer.kl(candidates, PROMPTS, base)
    layers = [0, 2, 1]
    induce = scorer.induce(candidates, layers, PROMPTS)
    log_p = torch.log_softmax(base, -1)
    for k, direction in enumerate(candidates):
        log_q = torch.log_softmax(single_candidate_logits(tiny_llama, tiny_tokenizer, PROMPTS, ablate=direction), -1)
        torch.testing.assert_close(kl[k], (log_p.exp() * (log_p - log_q)).sum(-1).mean(), rtol=1e-4, atol=1e-5)
        added = single_candidate_logits(tiny_llama, tiny_tokenizer, PROMPTS, add=direction, layer=layers[k])
        torch.testing.assert_close(induce[k], judge.refusal_score(added, REFUSAL_TOKENS).mean(), rtol=1e-4, atol=1e-4)
    assert (kl > 0).all()


@pytest.mark.parametrize("filtered", [False, True])
def test_capture_means_match_output_hidden_states(tiny_llama, tiny_tokenizer, filtered):
    """The running means equal the means of `output_hidden_states`; with a filter, over the
    prompts whose logits it keeps (here: the refusal score above its median)."""
    n = len(chat.post_instruction_ids(tiny_tokenizer))
    states = [None] * len(PROMPTS)  # [layers, n, d] per prompt, in the caller's order
    scores = torch.empty(len(PROMPTS))
    for batch in chat.batches(tiny_tokenizer, PROMPTS, 3):
        with torch.no_grad():
            out = tiny_llama(**batch.model_inputs(), output_hidden_states=True)
        for row, prompt in enumerate(batch.rows):
            states[prompt] = torch.stack(out.hidden_states[:-1])[:, row, -n:]  # hidden_states[l] is layer l's input
        scores[batch.rows] = judge.refusal_score(out.logits[:, -1], REFUSAL_TOKENS)
    states = torch.stack(states, 1)
    threshold = scores.median().item()
    keep = (lambda logits: judge.refusal_score(logits, REFUSAL_TOKENS) > threshold) if filtered else None
    expected_kept = torch.nonzero(scores > threshold).flatten().tolist() if filtered else list(range(len(PROMPTS)))
    assert 0 < len(expected_kept) <= len(PROMPTS)

    means = capture.mean_activations(
        tiny_llama, list(tiny_llama.model.layers), tiny_tokenizer, PROMPTS, n_positions=n, batch_size=2, keep=keep
    )
    assert means.kept == expected_kept
    torch.testing.assert_close(means.mean, states[:, expected_kept].mean(1), rtol=1e-5, atol=1e-5)


def test_capture_says_when_the_filter_keeps_nothing(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match="kept none of the 5 instructions"):
        capture.mean_activations(
            tiny_llama,
            list(tiny_llama.model.layers),
            tiny_tokenizer,
            PROMPTS,
            n_positions=1,
            keep=lambda logits: torch.zeros(len(logits), dtype=torch.bool),
        )
