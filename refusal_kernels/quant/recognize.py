"""Recognize a quantized weight by its attributes (torchao, bitsandbytes, GPTQ, AWQ, fp8) and
bind it to its format's op, so that the quantization libraries need not be installed here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch

from .._checks import check_awq, check_fp8, check_int8
from . import awq, fp8, gptq, int8, nf4

_FP8_SCALE_SUFFIXES = ("_scale_inv", "_scale")
_INT4_FORMATS = ("gptq", "awq")


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized [out, in] weight found by `find_quantized_weight`, ready to be orthogonalized.

    format: "torchao-int8", "torchao-fp8", "bitsandbytes-int8", "bitsandbytes-nf4" (or "-fp4"),
        "gptq", "awq" or "fp8".
    tensor_name: the attribute that holds the main stored tensor ("weight", "qweight", or the
        fused experts' "down_proj").
    shape: (out, in) of the dequantized weight; (experts, out, in) for fused experts.
    storage: every tensor the edit writes, so that a caller can copy them first.
    """

    format: str
    tensor_name: str
    shape: tuple[int, int]
    storage: tuple[torch.Tensor, ...]
    # The format's check and orthogonalize_ with the stored tensors bound; direction and scale by keyword.
    _check: Callable[..., object]
    _orthogonalize: Callable[..., None]

    def check(self, direction: torch.Tensor, scale: float = 1.0) -> None:
        """Raise the op's ValueError/TypeError for these tensors and this direction; writes nothing."""
        self._check(direction=direction, scale=scale)

    def orthogonalize_(self, direction: torch.Tensor, scale: float = 1.0) -> None:
        """W <- W - scale * d (d^T W) on the stored tensors, in place."""
        self._orthogonalize(direction=direction, scale=scale)


def _attr(obj, name):
    return getattr(obj, name, None)


def _declared(target, *names: str) -> int | None:
    """An integer attribute that quantization libraries spell in different ways, if present."""
    return next((int(v) for name in names if isinstance(v := _attr(target, name), int)), None)


# torchao's qdata dtype -> (format name, the op's check, the op).
_TORCHAO_FORMATS = {
    torch.int8: ("torchao-int8", check_int8, int8.orthogonalize_),
    torch.float8_e4m3fn: ("torchao-fp8", check_fp8, fp8.orthogonalize_),
}


def _torchao(qdata: torch.Tensor, scale: torch.Tensor, tensor_name: str = "weight") -> QuantizedWeight:
    """A torchao Int8Tensor or Float8Tensor's (qdata, scale): W = qdata * scale, one scale per block of qdata."""
    if qdata.dtype not in _TORCHAO_FORMATS:
        raise TypeError(f"only int8 and float8_e4m3fn torchao tensors are supported, got qdata of dtype {qdata.dtype}")
    name, check, orthogonalize_ = _TORCHAO_FORMATS[qdata.dtype]
    return QuantizedWeight(
        name,
        tensor_name,
        tuple(qdata.shape),
        (qdata, scale),
        partial(check, qdata, scale),
        partial(orthogonalize_, qdata, scale),
    )


def _bitsandbytes_int8(module) -> QuantizedWeight | None:
    """CB and SCB of a Linear8bitLt: on the weight before the first forward, on module.state after it."""
    weight, state = _attr(module, "weight"), _attr(module, "state")
    for holder in (weight, state):
        cb, scb = _attr(holder, "CB"), _attr(holder, "SCB")
        if isinstance(cb, torch.Tensor) and isinstance(scb, torch.Tensor):
            return QuantizedWeight(
                "bitsandbytes-int8",
                "weight",
                tuple(cb.shape),
                (cb, scb),
                partial(check_int8, cb, scb),
                partial(int8.orthogonalize_, cb, scb, absmax_scale=True),
            )
    return None


def _bitsandbytes_4bit(module) -> QuantizedWeight | None:
    weight = _attr(module, "weight")
    state = _attr(weight, "quant_state")
    if state is None:
        return None
    quant_type = _attr(state, "quant_type")
    if quant_type not in (None, "nf4", "fp4"):
        raise TypeError(f"unsupported bitsandbytes 4-bit quant_type {quant_type!r}")
    nested = {}
    if _attr(state, "nested"):
        nested = {
            "nested_absmax": state.state2.absmax,
            "nested_offset": state.offset,
            "nested_code": state.state2.code,
            "nested_blocksize": state.state2.blocksize,
        }
    q = nf4.NF4Weight(weight.data, state.absmax, state.code, state.blocksize, **nested)
    written = (q.packed, q.absmax, q.nested_absmax, q.nested_offset)
    return QuantizedWeight(
        f"bitsandbytes-{quant_type or 'nf4'}",
        "weight",
        tuple(state.shape),
        tuple(t for t in written if t is not None),
        partial(nf4.check, q),
        partial(nf4.orthogonalize_, q),
    )


def _int4_format(target, qweight: torch.Tensor, out: int) -> str:
    """Which of "gptq" and "awq" qweight's shape is: packed along in ([in / 8, out]) or along out ([in, out / 8]).

    A class name, module or `quant_method` that names one of them must agree with the shape.
    """
    fitting = [
        name for name, packed_out in zip(_INT4_FORMATS, (out, out / 8), strict=True) if qweight.shape[1] == packed_out
    ]
    if len(fitting) != 1:
        raise ValueError(
            f"qweight shape {tuple(qweight.shape)} is neither GPTQ packing [in / 8, {out}] nor AWQ packing "
            f"[in, {out} / 8] for out_features = {out}"
        )
    hint = f"{_attr(target, 'quant_method') or ''} {type(target).__module__} {type(target).__name__}".lower()
    named = [name for name in _INT4_FORMATS if name in hint]
    if len(named) == 1 and named != fitting:
        raise ValueError(
            f"{type(target).__name__} is marked {named[0].upper()}, but qweight shape {tuple(qweight.shape)} "
            f"is {fitting[0].upper()} packing"
        )
    return fitting[0]


def _gptq_zeros_format(target) -> str:
    """How a GPTQ module's qzeros store the zero points: "v1" (minus 1, the default) or "v2" (as is).

    GPTQModel records it on each module as `qzero_format()` (1 or 2; its kernels that need v2
    convert v1 checkpoints when they load them) and on its QuantizeConfig as
    `checkpoint_format` ("gptq" or "gptq_v2"); AutoGPTQ modules record nothing and are v1.
    """
    qzero_format = _attr(target, "qzero_format")
    if callable(qzero_format):
        version = qzero_format()
        if version not in (1, 2):
            raise ValueError(f"qzero_format() is {version!r}: expected 1 (GPTQ v1) or 2 (GPTQ v2)")
        return f"v{version}"
    checkpoint_format = _attr(target, "checkpoint_format")
    if checkpoint_format is None:
        return "v1"
    formats = {"gptq": "v1", "gptq_v2": "v2"}
    name = _attr(checkpoint_format, "value") or checkpoint_format  # GPTQModel's FORMAT enum, or its string
    if name not in formats:
        raise ValueError(f"checkpoint_format is {checkpoint_format!r}: expected 'gptq' (v1) or 'gptq_v2'")
    return formats[name]


def _gptq_or_awq(target, out_features: int | None) -> QuantizedWeight:
    qweight, qzeros, scales = target.qweight, target.qzeros, target.scales
    if qweight.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"qweight and scales must be 2-D, got shapes {tuple(qweight.shape)} and {tuple(scales.shape)}")
    out = out_features if out_features is not None else scales.shape[1]
    fmt = _int4_format(target, qweight, out)
    bits = _declared(target, "bits", "w_bit")
    if bits not in (None, 4):
        raise ValueError(f"bits is {bits}: only 4-bit GPTQ and AWQ are supported")
    in_features = 8 * qweight.shape[0] if fmt == "gptq" else qweight.shape[0]
    # Libraries that record the layer's size must agree with the packed shapes.
    for what, declared, found in (
        ("in_features", _declared(target, "in_features", "infeatures"), in_features),
        ("out_features", _declared(target, "out_features", "outfeatures"), out),
    ):
        if declared is not None and declared != found:
            raise ValueError(
                f"{what} is {declared}, but qweight shape {tuple(qweight.shape)} holds {fmt} {what} {found}"
            )
    num_groups = scales.shape[0]
    if num_groups == 0 or in_features % num_groups:
        raise ValueError(
            f"scales shape {tuple(scales.shape)} does not split in_features = {in_features} into equal groups"
        )
    group_size = in_features // num_groups
    if fmt == "awq":
        check = partial(check_awq, qweight, qzeros, scales, group_size=group_size)
        run = partial(awq.orthogonalize_, qweight, qzeros, scales, group_size=group_size)
    else:
        g_idx = _attr(target, "g_idx")
        layout = {"group_size": group_size, "zeros_format": _gptq_zeros_format(target)}
        check = partial(gptq.check, qweight, qzeros, scales, g_idx, **layout)
        run = partial(gptq.orthogonalize_, qweight, qzeros, scales, g_idx, **layout)
    return QuantizedWeight(fmt, "qweight", (out, in_features), (qweight, qzeros, scales), check, run)


def _fp8_scale(target, tensor_name: str) -> torch.Tensor:
    """The dequantization scale stored next to an fp8 tensor: <tensor_name>_scale_inv or <tensor_name>_scale."""
    names = tuple(tensor_name + suffix for suffix in _FP8_SCALE_SUFFIXES)
    weight_scale = next((s for name in names if (s := _attr(target, name)) is not None), None)
    if weight_scale is None:
        raise TypeError(f"fp8 {tensor_name} without any of {names}")
    return weight_scale.data


def _fp8(weight: torch.Tensor, weight_scale: torch.Tensor, tensor_name: str = "weight") -> QuantizedWeight:
    return QuantizedWeight(
        "fp8",
        tensor_name,
        tuple(weight.shape),
        (weight, weight_scale),
        partial(check_fp8, weight, weight_scale),
        partial(fp8.orthogonalize_, weight, weight_scale),
    )


def _check_experts(experts: list[QuantizedWeight], direction: torch.Tensor, scale: float) -> None:
    for index, expert in enumerate(experts):
        try:
            expert.check(direction, scale)
        except (ValueError, TypeError) as error:
            raise type(error)(f"expert {index}: {error}") from error


def _orthogonalize_experts(experts: list[QuantizedWeight], direction: torch.Tensor, scale: float) -> None:
    """Every expert is checked before the first is written; then each is edited in place on its slice."""
    _check_experts(experts, direction, scale)
    for expert in experts:
        expert.orthogonalize_(direction, scale)


def find_quantized_experts(experts, out_features: int, name: str = "down_proj") -> QuantizedWeight | None:
    """The quantized fused experts [E, out, in] that `experts.<name>` holds; None when they are dense.

    Each expert is a slice of the stored tensors, edited in place by its format's op, and every
    expert is checked before the first is written. Recognized, as the libraries store them:
      * a torchao Int8Tensor or Float8Tensor of 3 dims (quantize_ with FqnToConfig on the
        parameter): qdata [E, out, in] with scale [E, out, 1] (per row) or
        [E, out / 128, in / 128] (blocks)
      * fp8 [E, out, in] with <name>_scale_inv or <name>_scale [E, ...] (transformers'
        FP8Experts: [E, ceil(out / 128), ceil(in / 128)] blocks, or [E, 1, 1] per expert)

    Raises:
        TypeError: quantized experts that no op can edit: one scale shared by all experts
            (torchao's PerTensor on 3 dims), experts stored transposed [E, in, out] (fbgemm's
            fp8 Llama 4 experts, scaled per output column), or another storage dtype (MXFP4's
            uint8 blocks). No library fuses int4 (GPTQ, AWQ), NF4 or LLM.int8 experts into one
            3-D tensor: GPTQModel, AutoAWQ and bitsandbytes keep one quantized linear per expert
            (found by `find_quantized_weight`), and compressed-tensors dequantizes the fused
            experts it loads.
        ValueError: scales that do not hold one tensor per expert.
    """
    weight = _attr(experts, name)
    if not isinstance(weight, torch.Tensor):
        return None
    if isinstance(_attr(weight, "qdata"), torch.Tensor) and isinstance(_attr(weight, "scale"), torch.Tensor):
        stored, weight_scale = weight.qdata, weight.scale
        expert = partial(_torchao, tensor_name=name)
    elif weight.dtype == torch.float8_e4m3fn:
        stored, weight_scale = weight.data, _fp8_scale(experts, name)
        expert = partial(_fp8, tensor_name=name)
    elif weight.dtype.is_floating_point:
        return None
    else:
        raise TypeError(f"{name} of dtype {weight.dtype}: no op edits fused experts stored this way")
    if stored.dim() != 3 or stored.shape[1] != out_features:
        raise TypeError(
            f"{name} has shape {tuple(stored.shape)}: quantized experts must be stored [E, out = {out_features}, in] "
            "(transposed experts, scaled per output column, have no op)"
        )
    count = stored.shape[0]
    if weight_scale.dim() != 3 or weight_scale.shape[0] != count:
        if weight_scale.numel() == 1:
            raise TypeError(
                f"{name} shares one scale among its {count} experts: each edited expert needs its own scale"
            )
        raise ValueError(
            f"{name}'s scale has shape {tuple(weight_scale.shape)}, not one scale tensor per expert [{count}, ...]"
        )
    each = [expert(stored[index], weight_scale[index]) for index in range(count)]
    return QuantizedWeight(
        each[0].format,
        name,
        tuple(stored.shape),
        (stored, weight_scale),
        partial(_check_experts, each),
        partial(_orthogonalize_experts, each),
    )


def find_quantized_weight(module_or_tensors, out_features: int | None = None) -> QuantizedWeight | None:
    """The quantized weight held by a module, mapping or tensor; None when it holds none.

    Recognized by attributes, so that the quantization libraries need not be installed here:
      * a torchao Int8Tensor (qdata int8 [N, K], scale [N, 1]) or Float8Tensor (qdata
        float8_e4m3fn, scale [1, 1], [N, 1] or [N / 128, K / 128]; W = qdata * scale), or a
        module whose weight is one
      * bitsandbytes Linear8bitLt (weight.CB / weight.SCB, or state.CB / state.SCB)
      * bitsandbytes Linear4bit (weight.quant_state; NF4 or FP4, nested or not)
      * a module or mapping with qweight, qzeros, scales (and optional g_idx): GPTQ or AWQ,
        told apart by the packed shapes (against `out_features`, by default scales' width)
      * an fp8 module or mapping: weight float8_e4m3fn with weight_scale_inv or weight_scale

    Raises:
        ValueError: GPTQ/AWQ tensors whose shapes agree with neither layout, or with
            something the module declares (its class, in/out features, bit width).
        TypeError: a quantized weight of a kind no op supports.
    """
    target = module_or_tensors
    if isinstance(target, Mapping):
        target = SimpleNamespace(**target)
    weight = target if isinstance(target, torch.Tensor) else _attr(target, "weight")

    if isinstance(_attr(weight, "qdata"), torch.Tensor) and isinstance(_attr(weight, "scale"), torch.Tensor):
        return _torchao(weight.qdata, weight.scale)
    found = _bitsandbytes_int8(target) or _bitsandbytes_4bit(target)
    if found is not None:
        return found
    if all(isinstance(_attr(target, name), torch.Tensor) for name in ("qweight", "qzeros", "scales")):
        return _gptq_or_awq(target, out_features)
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.float8_e4m3fn:
        return _fp8(weight.data, _fp8_scale(target, "weight"))
    return None


def orthogonalize_quantized_(module_or_tensors, direction: torch.Tensor, scale: float = 1.0):
    """W <- W - scale * d (d^T W) on a quantized residual-stream writer, in place.

    Args:
        module_or_tensors: anything `find_quantized_weight` recognizes.
        direction: [d_model] (the weight's out_features), any float dtype.
        scale: 1 removes the component, as in `refusal_kernels.orthogonalize_`.

    Returns:
        module_or_tensors, for chaining.

    Raises:
        TypeError: nothing recognizable as a supported quantized weight.
        ValueError: as `find_quantized_weight`, and the op's own checks.
    """
    quantized = find_quantized_weight(module_or_tensors)
    if quantized is None:
        raise TypeError(
            f"{type(module_or_tensors).__name__} is not a recognized quantized weight: expected bitsandbytes "
            "Linear8bitLt/Linear4bit, GPTQ/AWQ qweight/qzeros/scales, a torchao int8 or float8 tensor, or an fp8 "
            "weight with weight_scale(_inv)"
        )
    quantized.orthogonalize_(direction, scale)
    return module_or_tensors
