"""Before/after evaluation: greedy refusal rates, KL, and cross-entropy on baseline completions.

Evaluate the unmodified model first (`evaluate(...)` with no baseline): that run's harmless
logits and answers become the baseline that a modified model (hooks or weights) is
compared against in the second run.

A reasoning model's answer whose reasoning never ends within max_new_tokens is neither a
refusal nor a compliance (see `judge.verdict`); its share is reported apart, as the unclear rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import chat, judge
from .scoring import kl_from_base, last_token_logits


@dataclass
class Evaluation:
    harmful_refusal: float  # fraction of harmful prompts refused (substring judge)
    harmless_refusal: float
    kl: float | None  # mean last-prompt-token KL(baseline || this model) on harmless prompts
    harmless_ce: float  # mean per-token cross-entropy on the baseline's harmless answers
    harmful_answers: list[str] = field(repr=False)
    harmless_answers: list[str] = field(repr=False)
    harmless_logits: torch.Tensor = field(repr=False)  # [N, vocab] float32, last prompt token
    harmful_unclear: float = 0.0  # fraction of harmful answers whose reasoning never ends
    harmless_unclear: float = 0.0

    def summary(self) -> dict[str, float | None]:
        """The scores; the unclear rates only when some answer was unclear, so that the summary
        of a model without reasoning keeps its four keys."""
        scores = {
            "harmful_refusal": self.harmful_refusal,
            "harmless_refusal": self.harmless_refusal,
            "kl": self.kl,
            "harmless_ce": self.harmless_ce,
        }
        if self.harmful_unclear or self.harmless_unclear:
            scores |= {"harmful_unclear": self.harmful_unclear, "harmless_unclear": self.harmless_unclear}
        return scores


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    baseline: Evaluation | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    phrases: Sequence[str] = judge.REFUSAL_PHRASES,
) -> Evaluation:
    harmful_answers = judge.generate(
        model, tokenizer, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size, description="harmful answers"
    )
    harmless_answers = judge.generate(
        model, tokenizer, harmless, max_new_tokens=max_new_tokens, batch_size=batch_size, description="harmless answers"
    )
    logits = last_token_logits(model, tokenizer, harmless, batch_size)
    kl = None
    if baseline is not None:
        kl = float(kl_from_base(torch.log_softmax(baseline.harmless_logits, dim=-1), logits).mean())
    # The base model is scored on its own answers, a modified one on the base model's.
    reference_answers = baseline.harmless_answers if baseline is not None else harmless_answers.texts
    ce = completion_cross_entropy(model, tokenizer, harmless, reference_answers, batch_size)
    reasoning_open = harmful_answers.reasoning_open  # both sets share the template
    return Evaluation(
        harmful_refusal=judge.refusal_rate(harmful_answers.texts, phrases, reasoning_open=reasoning_open),
        harmless_refusal=judge.refusal_rate(harmless_answers.texts, phrases, reasoning_open=reasoning_open),
        kl=kl,
        harmless_ce=ce,
        harmful_answers=harmful_answers.texts,
        harmless_answers=harmless_answers.texts,
        harmless_logits=logits,
        harmful_unclear=judge.unclear_rate(harmful_answers.texts, reasoning_open=reasoning_open),
        harmless_unclear=judge.unclear_rate(harmless_answers.texts, reasoning_open=reasoning_open),
    )


def completion_cross_entropy(
    model: nn.Module, tokenizer, instructions: Sequence[str], completions: Sequence[str], batch_size: int
) -> float:
    """Mean per-token NLL of `completions` (teacher-forced) after each rendered instruction."""
    device = next(model.parameters()).device
    prompts = chat.encode(tokenizer, chat.render(tokenizer, instructions))
    answers = chat.encode(tokenizer, completions)
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        rows = range(start, min(start + batch_size, len(prompts)))
        sequences = [prompts[i] + answers[i] for i in rows]
        ids, mask = chat.left_padded(sequences, chat.pad_id(tokenizer))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float().cpu()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
        width = ids.shape[1]
        for row, i in enumerate(rows):
            n = len(answers[i])
            if n:
                total += float(nll[row, width - 1 - n :].sum())
                count += n
    return total / max(count, 1)
