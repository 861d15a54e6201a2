"""Batched scoring of candidate directions: many candidates per forward pass.

Each batch row carries its own candidate: a prompt batch is repeated once per candidate in a
chunk, and the hooks ablate (with `ablate_indexed_`) or add the row's candidate. Only the
last position's logits are computed (`logits_to_keep=1`).

`Sites` says where the residual stream is written: each decoder layer's input, and each
module whose output is added to the residual stream (attention and MLP, or their post-norms).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..hf.hooks import PatchHandle, hook_structure
from ..hf.writes import on_input, on_write
from . import chat, judge


@dataclass
class Sites:
    layers: Sequence[nn.Module]  # decoder layers: their input is the residual stream
    writers: Sequence[nn.Module]  # modules whose output is added to the residual stream

    @classmethod
    def of(cls, model: nn.Module) -> Sites:
        """The sites of a transformers causal LM, from its module structure."""
        structure = hook_structure(model)
        return cls(
            layers=[layer.layer for layer in structure.layers],
            writers=[site.module for layer in structure.layers for site in layer.sites],
        )


@dataclass
class _RowCandidates:
    """The candidates of the current batch: directions [K, d] and one index per batch row."""

    directions: torch.Tensor | None = None
    index: torch.Tensor | None = None
    by_device: dict = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # device_map models spread layers over devices: keep one copy per device per batch.
        if device not in self.by_device:
            self.by_device[device] = (self.directions.to(device), self.index.to(device))
        return self.by_device[device]

    def set(self, directions: torch.Tensor, index: torch.Tensor) -> None:
        self.directions, self.index, self.by_device = directions, index, {}


@contextmanager
def row_ablation(sites: Sites, current: _RowCandidates) -> Iterator[None]:
    """Ablate each row's candidate at every layer input and every residual write."""

    def ablate(hidden: torch.Tensor) -> None:
        directions, index = current.on(hidden.device)
        ops.ablate_indexed_(hidden, directions, index)

    handles = [on_input(layer, ablate) for layer in sites.layers] + [on_write(w, ablate) for w in sites.writers]
    with PatchHandle(handles):
        yield


@contextmanager
def row_addition(sites: Sites, layer_of_row: list[torch.Tensor], vectors: list[torch.Tensor]) -> Iterator[None]:
    """Add vectors[l] (one per row in layer_of_row[l]) to the input of layer l, all positions."""

    def adder(layer_index: int):
        def add(hidden: torch.Tensor) -> None:
            rows, added = layer_of_row[layer_index], vectors[layer_index]
            if rows.numel():
                hidden[rows.to(hidden.device)] += added.to(hidden.device, hidden.dtype)[:, None, :]

        return add

    with PatchHandle([on_input(layer, adder(i)) for i, layer in enumerate(sites.layers)]):
        yield


def _next_token_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] float32 (CPU) after the last position; only that position is computed."""
    device = next(model.parameters()).device
    out = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, logits_to_keep=1
    )
    return out.logits[:, -1, :].float().cpu()


def kl_from_base(base_log_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base || model) per row, from the base model's log-probabilities and the model's logits [..., vocab]."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    return (base_log_probs.exp() * (base_log_probs - log_q)).sum(-1)


def last_token_logits(model: nn.Module, tokenizer, instructions: Sequence[str], batch_size: int) -> torch.Tensor:
    """Next-token logits after each rendered instruction: [N, vocab] float32 (CPU), in order."""
    out = None
    for batch in chat.batches(tokenizer, instructions, batch_size):
        logits = _next_token_logits(model, batch.input_ids, batch.attention_mask)
        if out is None:
            out = torch.empty(len(instructions), logits.shape[-1])
        out[batch.rows] = logits
    return out


class Scorer:
    """Scores candidates on prompt sets; counts every sequence it forwards."""

    def __init__(
        self, model: nn.Module, tokenizer, sites: Sites, refusal_tokens: Sequence[int], *, batch_size: int = 32
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.sites = sites
        self.refusal_tokens = list(refusal_tokens)
        self.batch_size = batch_size
        self.sequences = 0

    @torch.inference_mode()
    def last_logits(self, instructions: Sequence[str]) -> torch.Tensor:
        """Unmodified next-token logits [N, vocab] float32 (CPU), in the caller's order."""
        self.sequences += len(instructions)
        return last_token_logits(self.model, self.tokenizer, instructions, self.batch_size)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.sequences += input_ids.shape[0]
        return _next_token_logits(self.model, input_ids, attention_mask)

    def _per_candidate(
        self, instructions: Sequence[str], num_candidates: int, run_chunk, description: str
    ) -> torch.Tensor:
        """Evaluates every (candidate, prompt) pair, about batch_size rows per forward pass.

        run_chunk(row_candidate, row_prompt, input_ids, attention_mask) returns one value per
        row; the result is the [num_candidates, len(instructions)] matrix of those values.
        """
        values = torch.empty(num_candidates, len(instructions))
        prompts_per_batch = max(1, min(len(instructions), self.batch_size))
        candidates_per_batch = max(1, self.batch_size // prompts_per_batch)
        steps = [
            (batch, start)
            for batch in chat.batches(self.tokenizer, instructions, prompts_per_batch)
            for start in range(0, num_candidates, candidates_per_batch)
        ]
        for batch, start in tqdm(steps, desc=f"{description} ({num_candidates} candidates)", leave=False):
            prompts = torch.tensor(batch.rows)
            ids = torch.arange(start, min(start + candidates_per_batch, num_candidates))
            row_candidate = ids.repeat_interleave(len(prompts))
            row_prompt = prompts.repeat(len(ids))
            input_ids = batch.input_ids.repeat(len(ids), 1)
            mask = batch.attention_mask.repeat(len(ids), 1)
            values[row_candidate, row_prompt] = run_chunk(row_candidate, row_prompt, input_ids, mask)
        return values

    def _ablated_logits(self, candidates: torch.Tensor, row_candidate, input_ids, mask) -> torch.Tensor:
        current = _RowCandidates()
        current.set(candidates, row_candidate)
        with row_ablation(self.sites, current):
            return self._forward(input_ids, mask)

    @torch.inference_mode()
    def bypass(self, candidates: torch.Tensor, instructions: Sequence[str]) -> torch.Tensor:
        """Mean refusal score with each candidate ablated everywhere: [K]."""

        def run(row_candidate, row_prompt, input_ids, mask):
            logits = self._ablated_logits(candidates, row_candidate, input_ids, mask)
            return judge.refusal_score(logits, self.refusal_tokens)

        return self._per_candidate(instructions, len(candidates), run, "bypass").mean(1)

    @torch.inference_mode()
    def kl(self, candidates: torch.Tensor, instructions: Sequence[str], base_logits: torch.Tensor) -> torch.Tensor:
        """Mean last-token KL(base || ablated) with each candidate ablated: [K].

        base_logits: [len(instructions), vocab], from `last_logits` (computed once).
        """
        base_log_probs = torch.log_softmax(base_logits.float(), dim=-1)

        def run(row_candidate, row_prompt, input_ids, mask):
            logits = self._ablated_logits(candidates, row_candidate, input_ids, mask)
            return kl_from_base(base_log_probs[row_prompt], logits)

        return self._per_candidate(instructions, len(candidates), run, "kl").mean(1)

    @torch.inference_mode()
    def induce(self, candidates: torch.Tensor, layers: Sequence[int], instructions: Sequence[str]) -> torch.Tensor:
        """Mean refusal score with each candidate added at its layer's input: [K]."""
        candidate_layer = torch.tensor(layers)

        def run(row_candidate, row_prompt, input_ids, mask):
            row_layer = candidate_layer[row_candidate]
            rows_of = [torch.nonzero(row_layer == layer).flatten() for layer in range(len(self.sites.layers))]
            vectors = [candidates[row_candidate[rows]] for rows in rows_of]
            with row_addition(self.sites, rows_of, vectors):
                return judge.refusal_score(self._forward(input_ids, mask), self.refusal_tokens)

        return self._per_candidate(instructions, len(candidates), run, "induce").mean(1)
