"""orthogonalize_model_(..., undo=True) and undo_: the weights come back within one rounding step.

The bound checked on every element is the one `refusal_kernels.hf.undo_` states:

    |W_r - W| <= ulp(m) + 2^-23 m + (2 d_model + 8) 2^-24 |s| |d_i| |x|,  m = max(|W'|, |W_r|)

(W the original, W' the edited, W_r the restored element, d the unit direction, x the column or
row the element belongs to). Measured on these tiny models: in float16 and bfloat16 the error is
at most one step of max(|W|, |W'|) (some elements land exactly one step away, 0.999 of the
bound); in float32 it is at most 6.3e-8, 0.31 of the bound, and the logits agree to 4.9e-7.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_hf_families import tiny_direction, tiny_model
from test_hf_hooks import _forward, _relative_difference
from test_hf_weights_quantized import GPTQLinear, _quantize_writers

import refusal_kernels
from refusal_kernels.hf import Peak, Schedule, orthogonalize_model_, undo_, weights
from refusal_kernels.hf import families as fam

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Llama; GPT-2 (Conv1D rows, learned positions, tied head); Gemma 2 (post norms, tied head);
# Qwen2-MoE (fused 3-D experts, shared expert).
UNDO_FAMILIES = ("llama", "gpt2", "gemma2", "qwen2_moe")
SCALES = {
    "scale 1": 1.0,
    "scale 0.7": 0.7,
    "peaked schedule": Schedule.peaked(
        2, attention=Peak(1.5, 1.0, 0.5, 1.0), mlp=Peak(-0.5, 0.0, 2.0, 0.5), embeddings=0.3
    ),
}


def _ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at each magnitude (the subnormal spacing below the normal range), fp64."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(magnitude.double().clamp_min(info.tiny)))) * info.eps


def _restoration_bound(entry, original: torch.Tensor, edited: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """undo_'s stated bound for every element of one tensor, fp64."""
    direction, vectors = entry.direction.double(), original.double()
    if entry.layout == fam.MATRIX:  # columns [..., d_model, d_in]: d_i along dim -2
        norms, direction_entries = vectors.norm(dim=-2, keepdim=True), direction[:, None]
    else:  # rows [..., d_model]: d_i along the last dim
        norms, direction_entries = vectors.norm(dim=-1, keepdim=True), direction
    magnitude = torch.maximum(edited.double().abs(), restored.double().abs())
    fp32_terms = 2**-23 * magnitude + (2 * direction.numel() + 8) * 2**-24 * abs(entry.scale) * direction_entries.abs()
    return _ulp(magnitude, original.dtype) + fp32_terms * norms


def _head_is_tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", UNDO_FAMILIES)
def test_undo_restores_every_parameter_within_one_rounding_step(family, dtype, scale):
    model = tiny_model(family).to(dtype)
    direction = tiny_direction(model)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    tied, logits = _head_is_tied(model), _forward(model)

    record = orthogonalize_model_(model, direction, scale=SCALES[scale], undo=True)
    entries = list(record.undo.entries)
    assert [e.name for e in entries] == [c.name for c in record.changed]
    assert [e.scale for e in entries] == [c.scale for c in record.changed]
    edited = {e.name: e.tensor.detach().clone() for e in entries}
    assert any(not torch.equal(edited[name], original[name]) for name in edited)
    # O(d_in) per matrix, O(rows) for row layouts: one fp32 number per residual vector.
    for entry in entries:
        assert entry.projection.dtype == torch.float32
        assert entry.projection.numel() * model.config.hidden_size == entry.tensor.numel()

    undo_(record)
    assert _head_is_tied(model) == tied and model.config.tie_word_embeddings == tied
    restored = dict(model.named_parameters())
    assert restored.keys() == original.keys()
    worst = 0.0
    for name, parameter in restored.items():
        if name not in edited:
            assert torch.equal(parameter, original[name]), name
    for entry in entries:
        now = restored[entry.name].detach()
        error = (now.double() - original[entry.name].double()).abs()
        ratio = error / _restoration_bound(entry, original[entry.name], edited[entry.name], now)
        worst = max(worst, float(ratio.max()))
    print(f"{family} {dtype} {scale}: largest restoration error {worst:.3f} of the bound")
    assert worst <= 1.0
    if dtype == torch.float32:
        assert _relative_difference(_forward(model), logits) < 1e-5


def test_undo_works_chunk_by_chunk(monkeypatch):
    """Chunks of a few vectors, with a remainder, restore as well as one chunk does."""
    monkeypatch.setattr(weights, "UNDO_CHUNK_ELEMENTS", 200)
    for family in ("gpt2", "qwen2_moe"):
        model = tiny_model(family).to(torch.bfloat16)
        direction = tiny_direction(model)
        original = {name: p.detach().clone() for name, p in model.named_parameters()}
        record = orthogonalize_model_(model, direction, undo=True)
        entries = list(record.undo.entries)
        edited = {e.name: e.tensor.detach().clone() for e in entries}
        for entry in entries:
            whole = weights._vectors(original[entry.name], entry.layout).float() @ entry.direction
            torch.testing.assert_close(entry.projection, whole, rtol=1e-5, atol=1e-6)
        undo_(record)
        for entry in entries:
            now = entry.tensor.detach()
            bound = _restoration_bound(entry, original[entry.name], edited[entry.name], now)
            assert bool(((now.double() - original[entry.name].double()).abs() <= bound).all()), entry.name


def test_undo_is_exported_from_the_package():
    assert refusal_kernels.undo_ is undo_


def test_a_spent_record_cannot_be_undone_again():
    model = tiny_model("qwen2")
    record = orthogonalize_model_(model, tiny_direction(model), undo=True)
    undo_(record)
    restored = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="already undone"):
        undo_(record)
    assert all(torch.equal(restored[name], p) for name, p in model.named_parameters())


def test_weights_changed_after_the_edit_are_named_and_nothing_is_restored():
    model = tiny_model("llama")
    record = orthogonalize_model_(model, tiny_direction(model), undo=True)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    edited = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=re.escape("model.layers.1.mlp.down_proj.weight was changed in place")):
        undo_(record)
    assert all(torch.equal(edited[name], p) for name, p in model.named_parameters())


@pytest.mark.parametrize(
    ("argument", "error", "message"),
    [
        (lambda m: orthogonalize_model_(m, tiny_direction(m)), ValueError, "record holds no undo data"),
        (lambda m: None, TypeError, "record must be an OrthogonalizationRecord, got NoneType"),
        (lambda m: m, TypeError, "got LlamaForCausalLM"),
    ],
)
def test_undo_rejects_what_is_not_an_undoable_record(argument, error, message):
    model = tiny_model("llama")
    with pytest.raises(error, match=message):
        undo_(argument(model))


def test_undo_refuses_quantized_writers_before_writing_anything():
    model = _quantize_writers(tiny_model("llama"), GPTQLinear)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape("model.layers.0.self_attn.o_proj (gptq): undo=True needs dense")):
        orthogonalize_model_(model, tiny_direction(model), undo=True)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


# Quantized storage has no norm-preserving edit, so that pair is not a case.
@pytest.mark.parametrize(
    ("quantized", "norm_preserving", "dtype"),
    [
        (False, False, torch.float32),
        (False, False, torch.bfloat16),
        (False, True, torch.float16),
        (True, False, torch.float32),
    ],
)
def test_undo_exact_restores_every_tensor_bit_for_bit_from_a_small_record(quantized, norm_preserving, dtype):
    model = tiny_model("llama").to(dtype)
    if quantized:
        model = _quantize_writers(model, GPTQLinear)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    record = orthogonalize_model_(model, tiny_direction(model), undo=weights.EXACT, norm_preserving=norm_preserving)
    assert any(not torch.equal(before[name], t) for name, t in model.state_dict().items())
    dense = [change for change in record.changed if change.format is None]
    assert [entry.name for entry in record.undo.entries] == [change.name for change in dense]
    # Dense tensors are restored from the O(d_in) record and a few fixed elements, never a copy.
    quantized_storage = {id(t) for m in model.modules() if isinstance(m, GPTQLinear) for t in m.buffers()}
    assert all(id(tensor) in quantized_storage for tensor, _ in record.undo.copies)
    assert bool(record.undo.copies) == quantized
    for entry in record.undo.entries:
        indices, values = entry.fixes
        fixes_bytes = values.nbytes + (0 if indices is None else indices.nbytes)
        assert fixes_bytes <= entry.tensor.nbytes
    if dtype != torch.float32:
        # In half precision the restore misses a few percent of the elements (see weights._fixes).
        fixed = sum(entry.fixes[0].numel() for entry in record.undo.entries)
        assert 0 < fixed < 0.15 * sum(entry.tensor.numel() for entry in record.undo.entries)
    undo_(record)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert _head_is_tied(model) == model.config.tie_word_embeddings
    with pytest.raises(ValueError, match="already undone"):
        undo_(record)


def test_an_unknown_undo_mode_is_a_value_error_and_writes_nothing():
    model = tiny_model("llama")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="undo must be False, True or 'exact', got 'snapshot'"):
        orthogonalize_model_(model, tiny_direction(model), undo="snapshot")
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def _norm_preserving_bound(entry, original: torch.Tensor, edited: torch.Tensor, restored: torch.Tensor):
    """undo_'s stated bound for a norm-preserving edit, fp64: the plain bound with its rounding
    term scaled by max(1, f) and a term for the rescaling, (2 d_model + 8) 2^-24 |W'| / f, where
    f = ||x - s c d|| / ||x|| is what the edit rescaled the vector by."""
    fraction = weights._kept_fraction(entry.norms, entry.projection, entry.scale).double()
    fraction = fraction[..., None, :] if entry.layout == fam.MATRIX else fraction[..., None]
    magnitude = torch.maximum(edited.double().abs(), restored.double().abs())
    plain = _restoration_bound(entry, original, edited, restored)
    rounding = _ulp(magnitude, original.dtype)
    rescaling = (2 * entry.direction.numel() + 8) * 2**-24 * edited.double().abs() / fraction
    return plain + rounding * (fraction.clamp_min(1) - 1) + rescaling


@pytest.mark.parametrize("scale", ["scale 1", "peaked schedule"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", UNDO_FAMILIES)
def test_norm_preserving_edit_keeps_norms_and_undo_restores_it(family, dtype, scale):
    model = tiny_model(family).to(dtype)
    direction = tiny_direction(model)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    logits = _forward(model)

    record = orthogonalize_model_(model, direction, scale=SCALES[scale], norm_preserving=True, undo=True)
    assert record.norm_preserving
    entries = list(record.undo.entries)
    edited = {e.name: e.tensor.detach().clone() for e in entries}
    for entry in entries:
        assert entry.norms is not None and entry.norms.shape == entry.projection.shape
        before = weights._vectors(original[entry.name], entry.layout).float().norm(dim=-1)
        after = weights._vectors(edited[entry.name], entry.layout).float().norm(dim=-1)
        torch.testing.assert_close(after, before, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
        torch.testing.assert_close(entry.norms, before, rtol=1e-6, atol=1e-7)

    undo_(record)
    worst = 0.0
    for entry in entries:
        now = entry.tensor.detach()
        error = (now.double() - original[entry.name].double()).abs()
        bound = _norm_preserving_bound(entry, original[entry.name], edited[entry.name], now)
        worst = max(worst, float((error / bound).max()))
    print(f"{family} {dtype} {scale} norm-preserving: largest restoration error {worst:.3f} of the bound")
    assert worst <= 1.0
    if dtype == torch.float32:
        assert _relative_difference(_forward(model), logits) < 1e-5


def test_norm_preserving_matrices_use_the_column_op():
    model = tiny_model("llama")
    direction = tiny_direction(model)
    weight = model.model.layers[0].mlp.down_proj.weight
    expected = weight.detach().clone()
    unit = direction.float() / direction.float().norm()
    refusal_kernels.orthogonalize_norm_preserving_(expected, unit, 0.7, axis="column")
    orthogonalize_model_(model, direction, scale=0.7, norm_preserving=True)
    torch.testing.assert_close(weight.detach(), expected)


def test_norm_preserving_refuses_quantized_writers_before_writing_anything():
    model = _quantize_writers(tiny_model("llama"), GPTQLinear)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape("(gptq): norm_preserving=True needs dense weights")):
        orthogonalize_model_(model, tiny_direction(model), norm_preserving=True)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
