"""One short forward pass that shows how a decoder writes into its residual stream.

`record` runs the model on a few tokens with a hook on every module of the decoder and keeps,
for each module called once, its first input and its output when they are residual-shaped
([..., d_model] with as many vectors as the probe has tokens). `combination` then answers the
question the structure reader asks of every layer: which few of these outputs, each times a
constant, add up to a given tensor (a layer's output minus its input, a sublayer's output, a
norm's input)? It solves least squares over subsets of one to four candidates from their Gram
matrix and takes the smallest subset that explains the target to within the rounding of the
model's dtype, preferring outer modules (an attention module over its output projection, whose
output is the same tensor).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

PROBE_TOKENS = 8
PROBE_SEED = 0
# The largest subset `combination` tries; a layer writes through at most this many sublayers.
MAX_TERMS = 4


@dataclass
class Call:
    """What one module received and returned on the probe's forward pass (fp32 copies, [n, d])."""

    input: torch.Tensor | None
    output: torch.Tensor | None
    calls: int = 1
    on_stream: bool = False  # its first input is d_model wide (possibly several streams: not kept then)


@dataclass
class Recording:
    """Every module's Call, by module, and the dtype of the residual states seen."""

    calls: dict[nn.Module, Call] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    def of(self, module: nn.Module) -> Call | None:
        call = self.calls.get(module)
        return call if call is not None and call.calls == 1 else None


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, dict):
        return _first_tensor(next(iter(value.values()), None))
    return None


def probe_ids(vocab_size: int, device: torch.device) -> torch.Tensor:
    """The probe's tokens: PROBE_TOKENS ids drawn with a fixed seed, away from the special ids at 0-2."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    low = min(3, vocab_size - 1)
    return torch.randint(low, vocab_size, (1, PROBE_TOKENS), generator=generator).to(device)


def run(model: nn.Module, ids: torch.Tensor) -> None:
    """One forward pass of `model` on `ids`, without a cache and in eval mode (restored after)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    for module in modes:
        # bitsandbytes repacks a 4-bit weight for its CPU kernel, rounding absmax to bfloat16, on
        # its first forward in eval mode: the probe must leave the model's storage as it is.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.training = True
    try:
        with torch.no_grad():
            try:
                model(input_ids=ids, use_cache=False)
            except TypeError:
                model(input_ids=ids)
    finally:
        for module, mode in modes.items():
            module.training = mode


class ProbeError(RuntimeError):
    """The model's forward pass failed during the probe; `where` names the innermost module it was in."""

    def __init__(self, where: str, error: Exception) -> None:
        super().__init__(f"in {where}: {type(error).__name__}: {error}")
        self.where = where


def record(model: nn.Module, modules: dict[str, nn.Module], hidden_size: int, ids: torch.Tensor) -> Recording:
    """Run the probe with hooks on `modules` (by name); keep the residual-shaped inputs and outputs
    of each. Raises ProbeError if the forward pass fails."""
    recording = Recording()
    width = ids.numel()
    names = {module: name for name, module in modules.items()}
    active: list[nn.Module] = []

    def residual(tensor) -> torch.Tensor | None:
        if (
            not isinstance(tensor, torch.Tensor)
            or not tensor.is_floating_point()
            or tensor.shape[-1:] != (hidden_size,)
        ):
            return None
        if tensor.numel() != width * hidden_size:
            return None
        recording.dtype = tensor.dtype
        return tensor.detach().reshape(width, hidden_size).float().clone()

    def before(module, args, kwargs):
        active.append(module)
        call = recording.calls.get(module)
        if call is not None:
            call.calls += 1
            return
        first = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        on_stream = isinstance(first, torch.Tensor) and first.is_floating_point() and first.shape[-1:] == (hidden_size,)
        recording.calls[module] = Call(residual(first), None, on_stream=on_stream)

    def after(module, args, kwargs, output):
        active.pop()
        call = recording.calls[module]
        if call.calls == 1:
            call.output = residual(_first_tensor(output))

    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        try:
            run(model, ids)
        except Exception as error:  # the model's own code: name where it failed
            where = f"{names[active[-1]] or 'the decoder'} ({type(active[-1]).__name__})" if active else "the decoder"
            raise ProbeError(where, error) from error
    finally:
        for handle in handles:
            handle.remove()
    return recording


def noise_floor(dtype: torch.dtype) -> float:
    """How much of a target's norm rounding alone may leave unexplained, for a model in `dtype`."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2 * torch.finfo(dtype).eps


def combination(
    target: torch.Tensor,
    candidates: list[tuple[str, torch.Tensor]],
    scale: torch.Tensor,
    dtype: torch.dtype,
) -> list[str] | None:
    """The names of the fewest candidates whose outputs, each times a constant, sum to `target`.

    target, candidates: [n, d] fp32. The unexplained part must be within the noise floor of
    `dtype` times `scale` (the norms of the states around the target, [n]), token by token. A
    subset is taken only if no larger one explains the target twice as well (a small
    sublayer drowned in rounding is not dropped), unless it is already within a sixteenth of the
    noise floor. Candidates with equal outputs count once: the
    first (outermost) is kept. None when no subset of up to MAX_TERMS explains it.
    """
    unique: list[tuple[str, torch.Tensor]] = []
    for name, value in candidates:
        if value.norm() > 0 and not any(torch.equal(value, kept) for _, kept in unique):
            unique.append((name, value))
    if not unique:
        return None
    a = torch.stack([value.reshape(-1) for _, value in unique]).double()
    b = target.reshape(-1).double()
    gram, rhs = a @ a.T, a @ b
    allowed = noise_floor(dtype) * float(scale.double().norm())
    best: list[tuple[float, tuple[int, ...]]] = []
    for size in range(1, min(MAX_TERMS, len(unique)) + 1):
        error, subset = _best_subset(gram, rhs, b, size)
        best.append((error, subset))
        if len(best) >= 2 and best[-2][0] <= allowed and (best[-2][0] <= allowed / 16 or error > best[-2][0] / 2):
            return [unique[i][0] for i in best[-2][1]]
    error, subset = best[-1]
    return [unique[i][0] for i in subset] if error <= allowed else None


def _best_subset(gram: torch.Tensor, rhs: torch.Tensor, b: torch.Tensor, size: int) -> tuple[float, tuple[int, ...]]:
    """The subset of `size` columns with the smallest least-squares residual norm, and that norm:
    every subset's normal equations solved in one batch."""
    subsets = torch.tensor(list(itertools.combinations(range(gram.shape[0]), size)), device=gram.device)
    g = gram[subsets[:, :, None], subsets[:, None, :]]
    r = rhs[subsets]
    coefficients, info = torch.linalg.solve_ex(g, r)
    explained = (r * coefficients).sum(-1)
    # A subset with two proportional candidates is singular: it cannot be the answer.
    explained = torch.where((info == 0) & torch.isfinite(explained), explained, -torch.inf)
    best = int(explained.argmax())
    error = max(float(b @ b) - float(explained[best]), 0.0) ** 0.5
    return error, tuple(subsets[best].tolist())
