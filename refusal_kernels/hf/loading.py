"""Load a model for abliteration: a local directory, a hub ID or a GGUF file, dequantized where needed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn


def _looks_like_path(spec: str) -> bool:
    # A hub ID is "name" or "owner/name"; anything else that does not exist is a missing path.
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.endswith(".gguf")


def _drop_quantization(model: nn.Module) -> None:
    # GGUF weights are dequantized on load, but transformers still marks the model quantized,
    # which would make save_pretrained refuse or write a wrong config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _dequantized_gguf() -> dict[str, Any]:
    # Newer transformers can keep GGUF blocks packed when a matmul kernel is installed; the
    # weights must be plain tensors here, since orthogonalization edits them.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


# Block-quantized GGML types; F32, F16 and BF16 are plain floats.
_PLAIN_GGML_TYPES = {"F32", "F16", "BF16", "F64"}


def multiplies_bf16_natively(device: str | torch.device) -> bool:
    """Whether bf16 matmuls run in hardware on `device`, at about twice fp32's speed: a CPU with
    AVX512-BF16 or AMX, or a CUDA GPU with bf16 support."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(
            getattr(torch.cpu, probe, lambda: False)()
            for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return False


def matmul_dtype(spec: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.dtype | None:
    """The dtype to multiply a model's matrices in when the caller names none (see `cast_matmuls_`):
    bfloat16 for a GGUF whose matrices are all block-quantized, on a device that multiplies bf16
    natively; else None (everything in the checkpoint's own dtype, float32 for a GGUF).

    bf16 rounds a weight by at most 2^-9 of its value, finer than the grid of any quantized type,
    while the matmuls run about twice as fast.
    """
    path = Path(spec).expanduser()
    if not (path.is_file() and path.suffix == ".gguf" and multiplies_bf16_natively(device)):
        return None
    from ..quant.gguf import container

    types = container.read(path).matrix_types
    return torch.bfloat16 if types and not types & _PLAIN_GGML_TYPES else None


# Set on a model by cast_matmuls_: what `precision` says of it.
_PRECISION = "refusal_kernels_precision"


def cast_matmuls_(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every `nn.Linear` and the token embedding table in `dtype`, and run them in it, while
    the residual stream, the norms, attention and every other module keep the model's own dtype.

    Each linear layer casts its input to `dtype` and its output back, and the token embedding casts
    its output back, so the stream never holds `dtype`: a model run wholly in bf16 rounds the
    stream at every layer, which changes more greedy answers than the matmuls' own rounding does
    (README, the main job). Ties between weights are kept (each parameter is cast in place).
    In place. A model cast once raises ValueError; a dtype that is not a floating-point
    torch.dtype, TypeError.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if hasattr(model, _PRECISION):
        raise ValueError(f"the model already runs in {getattr(model, _PRECISION)}")
    stream = _stream_dtype(model)
    embedding = model.get_input_embeddings()
    embeddings = [embedding] if isinstance(embedding, nn.Embedding) else []
    # Only plain nn.Linear: a quantized subclass keeps its own storage and kernels.
    linears = [module for module in model.modules() if type(module) is nn.Linear]
    for module in [*linears, *embeddings]:
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)

    def cast_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.to(stream)

    for module in linears:
        module.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))
        module.register_forward_hook(cast_output)
    for module in embeddings:
        module.register_forward_hook(cast_output)
    setattr(model, _PRECISION, f"{_name(dtype)} matmuls, {_name(stream)} elsewhere")


def _stream_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {param.dtype for param in model.parameters() if param.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"cast_matmuls_ needs a model in one floating-point dtype, got {sorted(map(str, dtypes))}")
    return dtypes.pop()


def precision(model: nn.Module) -> str:
    """The dtype a model runs in, in words: "float32", or "bfloat16 matmuls, float32 elsewhere"
    after `cast_matmuls_`."""
    return getattr(model, _PRECISION, None) or _name(next(model.parameters()).dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        spec: a local transformers directory (safetensors weights), a `.gguf` file
            (dequantized to `dtype`), or a hub ID such as "Qwen/Qwen2.5-0.5B-Instruct".
        dtype: e.g. torch.bfloat16; None keeps the checkpoint's dtype (float32 for GGUF).
        device_map: passed to from_pretrained ("auto", "cpu", a dict, ...).
        trust_remote_code: passed to from_pretrained.

    Returns:
        (model, tokenizer).

    Raises:
        ValueError: `spec` names a path that does not exist, a directory without config.json,
            or a file that cannot be read (corrupt or not a model).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a path or a hub ID string, got {type(spec).__name__}")
    text = os.fspath(spec)
    path = Path(text).expanduser()
    options: dict[str, Any] = {"device_map": device_map, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        options["dtype"] = dtype

    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"spec {text!r} is a file but not a .gguf file; pass a model directory instead")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, **options, **_dequantized_gguf()
            )
        except Exception as error:
            raise ValueError(f"spec {text!r} could not be read as a GGUF model: {error}") from error
        _drop_quantization(model)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"spec {text!r} is a directory without config.json")
        try:
            model = _auto_class(path, trust_remote_code).from_pretrained(path, use_safetensors=True, **options)
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise ValueError(
                f"spec {text!r}: the weights could not be read (corrupt or incomplete?): {error}"
            ) from error
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    elif _looks_like_path(text):
        raise ValueError(f"spec {text!r} does not exist")
    else:
        model = _auto_class(text, trust_remote_code).from_pretrained(text, use_safetensors=True, **options)
        tokenizer = AutoTokenizer.from_pretrained(text, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def _auto_class(source: str | Path, trust_remote_code: bool):
    """AutoModelForCausalLM, or AutoModelForImageTextToText for a multimodal checkpoint that has no
    causal-LM class (Qwen2.5-VL, LLaVA, ...), so that it loads, and saves, as its own class."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM
