"""Chat-template plumbing shared by every stage: prompts in, left-padded token batches out.

Left padding puts the post-instruction tokens (the paper's "eoi" tokens: what the template
appends after the user's text) at the same negative positions in every row, so each stage
reads them as `hidden[:, -n:, :]` without per-row bookkeeping.

Reasoning templates: `thinking` switches a template that reads `enable_thinking` (Qwen3)
on or off; None keeps the template's own default, or the one `set_thinking` gave the
tokenizer. Whatever the template appends after the instruction counts as post-instruction tokens, reasoning markers included: Qwen3's empty
`<think>\n\n</think>\n\n` with thinking off, and the `<think>\n` that an R1-distill template
opens after the assistant tag. The model reads the instruction through those tokens before it
writes its first one, so they are where the refusal direction is looked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# Two instructions that share no trailing characters, so the common suffix of their
# rendered templates is exactly what the template adds after the user's text.
_PROBES = ("Name three colours of the rainbow?", "zq 7 unrelated request xx")


def reads_enable_thinking(tokenizer) -> bool:
    """Whether the chat template has an `enable_thinking` switch (Qwen3 and its kin)."""
    # A tokenizer may hold several named templates in a dict; any of them counts.
    return "enable_thinking" in str(tokenizer.chat_template or "")


_THINKING_ATTRIBUTE = "_refusal_kernels_thinking"


def set_thinking(tokenizer, thinking: bool | None) -> None:
    """Make `thinking` the default of every later render with this tokenizer, so that direction
    finding, scoring, search and evaluation all see the same prompts (None: the template's own)."""
    template_options(tokenizer, thinking)  # checks it
    tokenizer.__dict__[_THINKING_ATTRIBUTE] = thinking


def template_options(tokenizer, thinking: bool | None) -> dict[str, bool]:
    """The extra apply_chat_template arguments that carry `thinking` (by default the tokenizer's
    `set_thinking` choice)."""
    if thinking is None:
        thinking = tokenizer.__dict__.get(_THINKING_ATTRIBUTE)
    if thinking is None:
        return {}
    if not isinstance(thinking, bool):
        raise TypeError(f"thinking must be True, False or None, got {type(thinking).__name__}")
    if not reads_enable_thinking(tokenizer):
        # Silently ignoring the switch would look like thinking was turned off when it was not.
        raise ValueError(
            f"thinking={thinking} needs a chat template that reads `enable_thinking`; "
            "this tokenizer's template does not, so pass thinking=None"
        )
    return {"enable_thinking": thinking}


def render(tokenizer, instructions: Sequence[str], *, thinking: bool | None = None) -> list[str]:
    """Each instruction as a single user turn, with the generation prompt appended."""
    options = template_options(tokenizer, thinking)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False, **options
        )
        for text in instructions
    ]


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    # The template already holds the special tokens (BOS, role markers) as text.
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def post_instruction_ids(tokenizer, *, thinking: bool | None = None) -> list[int]:
    """The token ids the chat template appends after any user instruction (see the module doc
    for reasoning markers)."""
    first, second = encode(tokenizer, render(tokenizer, _PROBES, thinking=thinking))
    n = 0
    while n < min(len(first), len(second)) and first[-1 - n] == second[-1 - n]:
        n += 1
    if n == 0:
        raise ValueError("the tokenizer's chat template appends no tokens after the instruction")
    return first[len(first) - n :]


def check_position(tokenizer, position: int) -> int:
    """The number of post-instruction positions; ValueError unless `position` indexes one (-n..-1)."""
    n_positions = len(post_instruction_ids(tokenizer))
    if isinstance(position, bool) or not isinstance(position, int) or not -n_positions <= position < 0:
        raise ValueError(
            f"position {position!r} is out of range: the chat template has post-instruction positions "
            f"-{n_positions}..-1"
        )
    return n_positions


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, left-padded
    attention_mask: torch.Tensor  # [B, T] int64
    rows: list[int]  # which prompts of the caller's list this batch holds, in row order

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.rows)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    raise AssertionError("unreachable")


def left_padded(token_lists: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(t) for t in token_lists), default=0)
    ids = torch.full((len(token_lists), width), pad, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
    return ids, mask


def batches(
    tokenizer, instructions: Sequence[str], batch_size: int, *, thinking: bool | None = None
) -> Iterator[Batch]:
    """Left-padded batches of the rendered instructions.

    Prompts of similar length share a batch (sorted by length), which keeps padding, and so
    wasted compute, small; `Batch.rows` maps each row back to the caller's order.
    """
    token_lists = encode(tokenizer, render(tokenizer, instructions, thinking=thinking))
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    pad = pad_id(tokenizer)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_padded([token_lists[i] for i in rows], pad)
        yield Batch(ids, mask, rows)
