"""refusal_kernels: find the refusal direction of a chat model and remove it, fast.

The ops follow "Refusal in Language Models Is Mediated by a Single Direction" (Arditi et al.,
2024): directional ablation x <- x - (x.r)r of every residual-stream write, and weight
orthogonalization W <- W - r(r^T W) of every matrix that writes into the residual stream.
"""

from . import _ops, quant, reference
from ._version import __version__ as __version__
from .backends import get_backend, set_backend
from .ops import ablate, ablate_, ablate_indexed_, orthogonalize_, orthogonalize_norm_preserving_

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
    "search",
    "set_backend",
    "undo_",
]


def __getattr__(name: str) -> object:
    # undo_ lives with orthogonalize_model_ in refusal_kernels.hf, and search in the pipeline:
    # imported only when asked for, so that the ops do not import transformers.
    if name == "undo_":
        from .hf import undo_

        return undo_
    if name == "search":
        from .pipeline.search import search

        return search
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
