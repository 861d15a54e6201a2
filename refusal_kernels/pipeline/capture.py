"""Mean residual-stream activations at each layer's input, at the post-instruction positions.

Means are accumulated in fp32 as running sums, so memory is O(layers x positions x d_model)
whatever the number of prompts; no activation is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hf.hooks import layer_input
from . import chat


@torch.inference_mode()
def mean_activations(
    model: nn.Module,
    layers: Sequence[nn.Module],
    tokenizer,
    instructions: Sequence[str],
    *,
    n_positions: int,
    batch_size: int = 16,
    description: str = "capture",
) -> torch.Tensor:
    """The mean input of each decoder layer over the instructions' last `n_positions` tokens.

    Returns:
        [len(layers), n_positions, d_model] float32, on the CPU.
    """
    if not instructions:
        raise ValueError(f"instructions is empty: nothing to average ({description})")
    sums: list[torch.Tensor | None] = [None] * len(layers)

    def accumulate(index: int):
        def hook(module, args, kwargs):
            tail = layer_input(args, kwargs)[:, -n_positions:, :].float().sum(0)
            sums[index] = tail if sums[index] is None else sums[index].add_(tail)

        return hook

    handles = [layer.register_forward_pre_hook(accumulate(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        steps = list(chat.batches(tokenizer, instructions, batch_size))
        for batch in tqdm(steps, desc=description, leave=False):
            model(**batch.to(device).model_inputs(), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([s.cpu() for s in sums]) / len(instructions)
