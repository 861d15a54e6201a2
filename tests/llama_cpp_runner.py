"""llama.cpp (llama-cpp-python) as the tests load it: without its extra CPU buffer types.

llama.cpp 0.3.36 repacks weights into extra buffer types for its faster CPU kernels; on the
Xeons with AMX here decode then segfaults (native and portable AVX2 builds alike), while the
plain CPU buffers run. `Llama` takes no switch for it, so the default model parameters are
wrapped while a model loads.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def _without_extra_buffer_types():
    from llama_cpp import llama_cpp as bindings

    default_params = bindings.llama_model_default_params

    def params():
        chosen = default_params()
        chosen.use_extra_bufts = False
        return chosen

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = default_params


def load_llama(model_path, **kwargs):
    """`llama_cpp.Llama(model_path, **kwargs)` on plain CPU buffers."""
    import llama_cpp

    with _without_extra_buffer_types():
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
