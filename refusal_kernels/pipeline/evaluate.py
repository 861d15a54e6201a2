"""Before/after evaluation: greedy refusal rates, KL, and cross-entropy on baseline completions.

Evaluate the unmodified model first (`evaluate(...)` with no baseline): that run's harmless
answers, and its logits along them, become the baseline that a modified model (hooks or
weights) is compared against in the second run. Both runs score the baseline's answers
teacher-forced, in one pass per batch: the cross-entropy of the whole answer, and KL(baseline
|| model) at the first `kl_tokens` positions (the last prompt token, then each answer token's).

A reasoning model's answer whose reasoning never ends within max_new_tokens is neither a
refusal nor a compliance (see `judge.verdict`); its share is reported apart, as the unclear rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .._checks import check_positive_int
from . import chat, judge
from .scoring import kl_from_base


@dataclass
class Evaluation:
    harmful_refusal: float  # fraction of harmful prompts refused (substring judge)
    harmless_refusal: float
    # mean KL(baseline || this model) on harmless prompts, over the first kl_tokens positions of
    # the baseline's answers (1: the next token after the prompt), each prompt weighted alike
    kl: float | None
    harmless_ce: float  # mean per-token cross-entropy on the baseline's harmless answers
    harmful_answers: list[str] = field(repr=False)
    harmless_answers: list[str] = field(repr=False)
    # [N, kl_tokens, vocab] float32 along the baseline's answers; NaN past a shorter answer's end
    harmless_logits: torch.Tensor = field(repr=False)
    harmful_unclear: float = 0.0  # fraction of harmful answers whose reasoning never ends
    harmless_unclear: float = 0.0
    reasoning_open: bool = False  # whether the prompts opened a reasoning block (see judge.split_reasoning)

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
    kl_tokens: int = 1,
) -> Evaluation:
    """Greedy answers judged for refusal, and the baseline's harmless answers scored teacher-forced
    (see the module docstring); kl_tokens must be at least 1 (ValueError)."""
    check_positive_int("kl_tokens", kl_tokens)
    harmful_answers = judge.generate(
        model, tokenizer, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size, description="harmful answers"
    )
    harmless_answers = judge.generate(
        model, tokenizer, harmless, max_new_tokens=max_new_tokens, batch_size=batch_size, description="harmless answers"
    )
    # The base model is scored on its own answers, a modified one on the base model's.
    reference_answers = baseline.harmless_answers if baseline is not None else harmless_answers.texts
    ce, logits = teacher_forced(model, tokenizer, harmless, reference_answers, batch_size, kl_tokens)
    reasoning_open = harmful_answers.reasoning_open  # both sets share the template
    return Evaluation(
        harmful_refusal=judge.refusal_rate(harmful_answers.texts, phrases, reasoning_open=reasoning_open),
        harmless_refusal=judge.refusal_rate(harmless_answers.texts, phrases, reasoning_open=reasoning_open),
        kl=None if baseline is None else answer_kl(baseline.harmless_logits, logits),
        harmless_ce=ce,
        harmful_answers=harmful_answers.texts,
        harmless_answers=harmless_answers.texts,
        harmless_logits=logits,
        harmful_unclear=judge.unclear_rate(harmful_answers.texts, reasoning_open=reasoning_open),
        harmless_unclear=judge.unclear_rate(harmless_answers.texts, reasoning_open=reasoning_open),
        reasoning_open=reasoning_open,
    )


def answer_kl(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over prompts of the mean KL(base || model) over each prompt's scored positions
    ([N, T, vocab] both, NaN rows past an answer's end); ValueError if the shapes differ (a
    baseline scored over another kl_tokens)."""
    if base_logits.shape != logits.shape:
        raise ValueError(
            f"the baseline was scored at {base_logits.shape[1]} positions per prompt, this model at "
            f"{logits.shape[1]}: evaluate both with the same kl_tokens"
        )
    scored = ~torch.isnan(base_logits[..., 0])
    kl = kl_from_base(torch.log_softmax(base_logits.nan_to_num(), dim=-1), logits.nan_to_num())
    per_prompt = (kl * scored).sum(1) / scored.sum(1)
    return float(per_prompt.mean())


def teacher_forced(
    model: nn.Module,
    tokenizer,
    instructions: Sequence[str],
    completions: Sequence[str],
    batch_size: int,
    kl_tokens: int = 1,
) -> tuple[float, torch.Tensor]:
    """`completions` fed after each rendered instruction: their mean per-token NLL, and the
    logits [N, kl_tokens, vocab] float32 (CPU) at the last prompt token and the first
    kl_tokens - 1 completion tokens (NaN where a completion is shorter)."""
    device = next(model.parameters()).device
    prompts = chat.encode(tokenizer, chat.render(tokenizer, instructions))
    answers = chat.encode(tokenizer, completions)
    total, count, kept = 0.0, 0, []
    for start in range(0, len(prompts), batch_size):
        rows = range(start, min(start + batch_size, len(prompts)))
        ids, mask = chat.left_padded([prompts[i] + answers[i] for i in rows], chat.pad_id(tokenizer))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float().cpu()
        nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        width = ids.shape[1]
        for row, i in enumerate(rows):
            n = len(answers[i])
            total, count = total + float(nll[row, width - 1 - n :].sum()), count + n
            positions = logits[row, width - 1 - n : width - 1 - n + kl_tokens]
            kept.append(
                torch.cat([positions, positions.new_full((kl_tokens - len(positions), logits.shape[-1]), float("nan"))])
            )
    return total / max(count, 1), torch.stack(kept) if kept else torch.empty(0, kl_tokens, 0)
