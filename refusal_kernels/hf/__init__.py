"""refusal_kernels.hf: apply the refusal direction to transformers models.

  patch(model, r)                  ablate r at run time (hooks) or in the weights, undoably
  add_direction(model, r, layer=)  activation addition at one layer's input
  orthogonalize_model_(model, r)   bake the ablation into the weights, in place
  undo_(record)                    restore them from orthogonalize_model_(..., undo=True)
  Schedule, Peak                   a scale per layer for attention and MLP writers (scale=)
  load_model / save_abliterated / orthogonalize_checkpoint   loading, saving, streaming

Only this package knows transformers module names; the structure detection is in `families`.
"""

from .families import ModelStructure, StructureError, describe_model
from .hooks import PatchHandle, add_direction, patch
from .io import load_model, orthogonalize_checkpoint, save_abliterated
from .schedule import Peak, Schedule
from .weights import ChangedTensor, OrthogonalizationRecord, orthogonalize_model_, undo_

__all__ = [
    "ChangedTensor",
    "ModelStructure",
    "OrthogonalizationRecord",
    "PatchHandle",
    "Peak",
    "Schedule",
    "StructureError",
    "add_direction",
    "describe_model",
    "load_model",
    "orthogonalize_checkpoint",
    "orthogonalize_model_",
    "patch",
    "save_abliterated",
    "undo_",
]
