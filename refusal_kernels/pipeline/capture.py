"""Mean residual-stream activations at each layer's input, at the post-instruction positions.

Means are accumulated in fp32 as running sums, so memory is O(layers x positions x d_model)
whatever the number of prompts (plus one batch's rows while its filter is read); no
activation outlives its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hf.writes import layer_input
from . import chat, judge


@dataclass
class Means:
    mean: torch.Tensor  # [layers, n_positions, d_model] float32 (CPU), over the kept prompts
    kept: list[int]  # indices of the prompts that entered the mean, ascending


@torch.inference_mode()
def mean_activations(
    model: nn.Module,
    layers: Sequence[nn.Module],
    tokenizer,
    instructions: Sequence[str],
    *,
    n_positions: int,
    batch_size: int = 16,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
    description: str = "capture",
) -> Means:
    """The mean input of each decoder layer over the instructions' last `n_positions` tokens.

    keep: a filter on each prompt's next-token logits ([B, vocab] float32 -> [B] bool), read
        from the same forward pass; only the prompts it keeps enter the mean. The paper keeps
        the harmful prompts the model refuses and the harmless ones it answers.

    Raises:
        ValueError: there are no instructions, or the filter kept none of them.
    """
    if not instructions:
        raise ValueError(f"instructions is empty: nothing to average ({description})")
    sums: list[torch.Tensor | None] = [None] * len(layers)
    tails: list[torch.Tensor | None] = [None] * len(layers)  # this batch's rows, until `keep` has seen the logits

    def record(index: int):
        def hook(module, args, kwargs):
            tails[index] = layer_input(args, kwargs)[:, -n_positions:, :].float()

        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    kept: list[int] = []
    try:
        for batch in tqdm(list(chat.batches(tokenizer, instructions, batch_size)), desc=description, leave=False):
            logits = model(**batch.to(device).model_inputs(), use_cache=False, logits_to_keep=1).logits[:, -1]
            rows = torch.ones(len(batch.rows), dtype=torch.bool) if keep is None else keep(logits.float().cpu())
            kept += judge.kept(batch.rows, rows)
            for i, tail in enumerate(tails):
                total = tail[rows.to(tail.device)].sum(0)
                sums[i] = total if sums[i] is None else sums[i].add_(total)
    finally:
        for handle in handles:
            handle.remove()
    if not kept:
        raise ValueError(f"the filter kept none of the {len(instructions)} instructions ({description})")
    return Means(torch.stack([s.cpu() for s in sums]) / len(kept), sorted(kept))
