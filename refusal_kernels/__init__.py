"""refusal_kernels: find the refusal direction of a chat model and remove it, fast.

The ops follow "Refusal in Language Models Is Mediated by a Single Direction" (Arditi et al.,
2024): directional ablation x <- x - (x.r)r of every residual-stream write, and weight
orthogonalization W <- W - r(r^T W) of every matrix that writes into the residual stream.

The ops import only torch. The model-facing API (find_direction, abliterate, search, patch,
orthogonalize_model_, ...) is imported when first asked for, so that `import refusal_kernels`
does not import transformers.
"""

import importlib

from . import _ops, quant, reference
from ._version import __version__ as __version__
from .backends import get_backend, set_backend
from .ops import ablate, ablate_, ablate_indexed_, orthogonalize_, orthogonalize_norm_preserving_

# Public name -> the module that defines it, imported on first access.
_MODEL_API = {
    "AbliterationOptions": "pipeline.options",
    "AbliterationReport": "pipeline.abliterate",
    "SearchTrial": "pipeline.abliterate",
    "abliterate": "pipeline.abliterate",
    "PromptSets": "pipeline.prompts",
    "SelectionOptions": "pipeline.options",
    "find_direction": "pipeline.select",
    "SearchOptions": "pipeline.options",
    "search": "pipeline.search",
    "orthogonalize_model_": "hf.weights",
    "undo_": "hf.weights",
    "patch": "hf.hooks",
}

__all__ = [
    "_ops",
    "ablate",
    "ablate_",
    "ablate_indexed_",
    "get_backend",
    "orthogonalize_",
    "orthogonalize_norm_preserving_",
    "quant",
    "reference",
    "set_backend",
    *sorted(_MODEL_API),
]


def __getattr__(name: str) -> object:
    if name in _MODEL_API:
        return getattr(importlib.import_module(f".{_MODEL_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
