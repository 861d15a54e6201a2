"""Run-time cost of `refusal_kernels.hf.patch(mode="hooks")` on a real model, CPU forward pass.

Qwen2.5-Coder-0.5B-Instruct (GGUF, dequantized to fp32), batch 8 x 64 tokens, no KV cache.
Three variants share the same input:

  * unpatched;
  * fused hooks: `patch(model, r)`, the in-place `ablate_` at the three sites of every layer;
  * eager hooks: the same sites with the eager-PyTorch one-liner `x - (x @ d)[..., None] * d`,
    out of place (what people write without this library).

pytest-benchmark times each variant; the overheads relative to the unpatched model are measured
in one interleaved loop (so that drift on a shared machine hits every variant alike) and stored
in `benchmark.extra_info` of the fused-hooks benchmark, with the hooks' own work timed alone
(`hook_work_pct_*`), which on a busy machine is the reliable figure. Target: <= 3 %.
REFUSAL_KERNELS_BENCH_ROUNDS sets the interleaved rounds (default 5).

The GGUF comes from `refusal_kernels.models.default_gguf_path()`, else from the environment
variable REFUSAL_KERNELS_GGUF; without either the benchmark is skipped.

    python -m pytest benchmarks/bench_hf_overhead.py --benchmark-only -s
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from refusal_kernels import ablate_
from refusal_kernels.hf import describe_model, load_model, patch

BATCH, TOKENS = 8, 64
INTERLEAVED_ROUNDS = int(os.environ.get("REFUSAL_KERNELS_BENCH_ROUNDS", "5"))


def _gguf_path() -> Path:
    try:
        from refusal_kernels.models import default_gguf_path

        return Path(default_gguf_path())
    except (ImportError, FileNotFoundError, OSError):
        pass
    from_env = os.environ.get("REFUSAL_KERNELS_GGUF")
    if not from_env:
        pytest.skip(
            "no GGUF model: refusal_kernels.models.default_gguf_path() is unavailable and REFUSAL_KERNELS_GGUF is unset"
        )
    path = Path(from_env)
    if not path.is_file():
        pytest.skip(f"REFUSAL_KERNELS_GGUF={from_env} is not a file")
    return path


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    model, _ = load_model(_gguf_path(), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (BATCH, TOKENS), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "use_cache": False}
    direction = torch.randn(model.config.hidden_size, generator=generator)
    return model, inputs, direction


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits


class _EagerHooks:
    """The same three sites per layer as patch(mode="hooks"), with out-of-place eager PyTorch."""

    def __init__(self, model: torch.nn.Module, direction: torch.Tensor) -> None:
        d = direction / direction.norm()

        def ablated(x: torch.Tensor) -> torch.Tensor:
            return x - (x @ d)[..., None] * d

        def on_input(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (ablated(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": ablated(kwargs["hidden_states"])}

        def on_output(module: Any, args: tuple, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return ablated(output)
            return (ablated(output[0]), *output[1:])

        self.handles = []
        for layer in describe_model(model).layers:
            self.handles.append(layer.layer.register_forward_pre_hook(on_input, with_kwargs=True))
            self.handles += [site.module.register_forward_hook(on_output) for site in layer.sites]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _interleaved_overheads(model, inputs, direction) -> dict[str, float]:
    """Median forward time of each variant over interleaved rounds, and overheads in percent."""
    times: dict[str, list[float]] = {"unpatched": [], "fused_hooks": [], "eager_hooks": []}
    _forward(model, inputs)  # warm-up
    for _ in range(INTERLEAVED_ROUNDS):
        for variant in times:
            handle = {"unpatched": None, "fused_hooks": patch, "eager_hooks": _EagerHooks}[variant]
            handle = handle(model, direction) if handle else None
            start = time.perf_counter()
            _forward(model, inputs)
            times[variant].append(time.perf_counter() - start)
            if handle:
                handle.remove()
    medians = {variant: statistics.median(values) for variant, values in times.items()}
    base = medians["unpatched"]
    return {
        **{f"median_s_{variant}": value for variant, value in medians.items()},
        "overhead_pct_fused_hooks": 100 * (medians["fused_hooks"] / base - 1),
        "overhead_pct_eager_hooks": 100 * (medians["eager_hooks"] / base - 1),
        "interleaved_rounds": INTERLEAVED_ROUNDS,
    }


def _hook_work_pcts(model, inputs, direction, forward_seconds: float) -> dict[str, float]:
    """The work the hooks add, timed alone on tensors of the sites' shape, as % of a forward.

    On a busy machine the end-to-end forward times vary by more than the hooks cost; this
    isolates it: 3 sites per layer, each one call of the fused op or of the eager one-liner.
    """
    sites = 3 * len(describe_model(model).layers)
    x = torch.randn(BATCH, TOKENS, model.config.hidden_size)
    unit = direction / direction.norm()
    variants = {"fused": lambda: ablate_(x, direction), "eager": lambda: x - (x @ unit)[..., None] * unit}
    result = {}
    for name, call in variants.items():
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(sites):
                call()
            samples.append(time.perf_counter() - start)
        result[f"hook_work_pct_{name}"] = 100 * statistics.median(samples) / forward_seconds
    return result


def test_forward_unpatched(benchmark, setup):
    model, inputs, _ = setup
    benchmark.pedantic(_forward, args=(model, inputs), rounds=3, warmup_rounds=1)


def test_forward_eager_hooks(benchmark, setup):
    model, inputs, direction = setup
    hooks = _EagerHooks(model, direction)
    try:
        benchmark.pedantic(_forward, args=(model, inputs), rounds=3, warmup_rounds=1)
    finally:
        hooks.remove()


def test_forward_fused_hooks(benchmark, setup):
    model, inputs, direction = setup
    overheads = _interleaved_overheads(model, inputs, direction)
    overheads.update(_hook_work_pcts(model, inputs, direction, overheads["median_s_unpatched"]))
    benchmark.extra_info.update(overheads)
    print({k: round(v, 4) for k, v in overheads.items()})
    with patch(model, direction):
        benchmark.pedantic(_forward, args=(model, inputs), rounds=3, warmup_rounds=1)
