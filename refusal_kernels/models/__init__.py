"""Models shipped with or fetched by the package: the default GGUF and the tiny demo model."""

from .default import (
    ModelUnavailableError,
    default_gguf_path,
    selection_preset,
    tiny_demo_path,
    tiny_demo_prompt_sets,
)

__all__ = ["ModelUnavailableError", "default_gguf_path", "selection_preset", "tiny_demo_path", "tiny_demo_prompt_sets"]
