"""refusal_kernels.hf: apply the refusal direction to transformers models.

  patch(model, r)                  ablate r at run time (hooks) or in the weights, undoably
  add_direction(model, r, layer=)  activation addition at one layer's input
  orthogonalize_model_(model, r)   bake the ablation into the weights, in place
  undo_(record)                    restore them from orthogonalize_model_(..., undo=True)
  check_structure(model, r)        the self-check both run: does the structure read remove r?
  Schedule, Peak                   a scale per layer for attention and MLP writers (scale=)
  StructureSpec, set_structure     name the layers and writers of a model nothing can read
  load_model / save_abliterated / orthogonalize_checkpoint   loading, saving, streaming
  orthogonalize_gguf               a GGUF file's writers, edited in their own GGML types
  export_lora, LoRAExport          the same edit as a rank-1 PEFT LoRA adapter

Only this package knows transformers module names; the structure detection is in `families`.
"""

from .checkpoint import orthogonalize_checkpoint
from .families import ModelStructure, StructureError, StructureSpec, describe_model, set_structure
from .gguf import GGUFEdit, orthogonalize_gguf
from .hooks import PatchHandle, add_direction, model_shape, patch
from .loading import load_model
from .lora import LoRAExport, export_lora
from .saving import save_abliterated
from .schedule import Peak, Schedule
from .verify import ResidualLeakError
from .weights import ChangedTensor, OrthogonalizationRecord, check_structure, orthogonalize_model_, undo_

__all__ = [
    "ChangedTensor",
    "GGUFEdit",
    "LoRAExport",
    "ModelStructure",
    "OrthogonalizationRecord",
    "PatchHandle",
    "Peak",
    "ResidualLeakError",
    "Schedule",
    "StructureError",
    "StructureSpec",
    "add_direction",
    "check_structure",
    "describe_model",
    "export_lora",
    "load_model",
    "model_shape",
    "orthogonalize_checkpoint",
    "orthogonalize_gguf",
    "orthogonalize_model_",
    "patch",
    "save_abliterated",
    "set_structure",
    "undo_",
]
