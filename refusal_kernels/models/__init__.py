"""Models shipped with or fetched by the package: the default GGUF and the tiny demo model."""

from .default import ModelUnavailableError, default_gguf_path, tiny_demo_path

__all__ = ["ModelUnavailableError", "default_gguf_path", "tiny_demo_path"]
