"""The self-check, the StructureSpec escape hatch, the hooks fallback and multimodal checkpoints."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from test_hf_families import _RawMatmul, tiny_direction, tiny_model
from tiny_configs import randomize_, tiny_config

from refusal_kernels import reference
from refusal_kernels.hf import (
    ResidualLeakError,
    StructureError,
    StructureSpec,
    describe_model,
    orthogonalize_model_,
    patch,
    save_abliterated,
    set_structure,
)
from refusal_kernels.hf import verify as self_check

LLAMA_SPEC = StructureSpec(layers="model.layers", writers={"self_attn.o_proj": "attention", "mlp.down_proj": "mlp"})
# Misses every MLP writer: what a misread structure looks like.
ATTENTION_ONLY = StructureSpec(layers="model.layers", writers={"self_attn.o_proj": "attention"})
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12]])


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _leak(model, direction) -> float:
    with torch.no_grad():
        hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states[:-1]
    unit = reference.unit(direction)
    return max(float(((h @ unit).abs() / h.norm(dim=-1)).max()) for h in hidden)


@pytest.mark.parametrize("mode", ["weights", "hooks"])
def test_a_missed_writer_is_caught_named_and_the_model_left_as_it_was(mode):
    model = tiny_model("llama")
    direction = tiny_direction(model)
    before = _state(model)
    call = (lambda: patch(model, direction, mode=mode, structure=ATTENTION_ONLY)) if mode == "hooks" else None
    call = call or (lambda: orthogonalize_model_(model, direction, structure=ATTENTION_ONLY))
    with pytest.raises(
        ResidualLeakError, match=r"model\.layers\.0 writes \d+\.\d+% of the state's norm along r"
    ) as error:
        call()
    assert "model.layers.0.self_attn.o_proj" in str(error.value)  # what was read there
    assert isinstance(error.value, StructureError)
    assert _same(model, before) and _no_hooks(model)


def test_verify_false_skips_the_check_and_the_leak_is_real():
    model = tiny_model("llama")
    direction = tiny_direction(model)
    orthogonalize_model_(model, direction, structure=ATTENTION_ONLY, verify=False)
    assert _leak(model, direction) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_correct_edit_passes_in_half_precision(dtype):
    model = tiny_model("qwen2").to(dtype)
    direction = tiny_direction(model)
    orthogonalize_model_(model, direction)  # the check passes within the dtype's tolerance
    with patch(model, direction, mode="hooks"):
        pass


def test_the_check_measures_each_layers_write_against_the_tolerance():
    model = tiny_model("gemma2")  # post-sublayer norms: writers orthogonalized against g * r
    structure = describe_model(model)
    direction = tiny_direction(model)
    from refusal_kernels.hf import families

    directions = families.layer_directions(direction, structure, None)
    expected = self_check.expectation(directions, embeddings=True)
    leaks = self_check.measure(model, structure, expected)
    assert [site for site, _, _ in leaks] == [
        "the embeddings (the first layer's input)",
        "model.layers.0",
        "model.layers.1",
    ]
    assert min(leak for _, leak, _ in leaks) > 1e-3  # unedited: r is everywhere
    with patch(model, direction, mode="weights"):
        assert max(leak for _, leak, _ in self_check.measure(model, structure, expected)) < 1e-5


def test_a_structure_spec_names_the_layers_and_writers():
    model = tiny_model("llama")
    direction = tiny_direction(model)
    read = {w.name for w in describe_model(model).writers()}
    assert {w.name for w in describe_model(model, LLAMA_SPEC).writers()} == read
    record = orthogonalize_model_(model, direction, structure=LLAMA_SPEC)
    assert {c.name for c in record.changed} == read
    assert _leak(model, direction) < 1e-5


def test_set_structure_makes_the_pipeline_use_a_spec():
    model = tiny_model("llama")
    model.model.layers[1].mlp.down_proj = _RawMatmul(128, 64)  # nothing can read this layer
    with pytest.raises(StructureError):
        describe_model(model)
    spec = StructureSpec(layers="model.layers", writers={"self_attn.o_proj": "attention"})
    set_structure(model, spec)
    assert [len(layer.writers) for layer in describe_model(model).layers] == [1, 1]
    set_structure(model, None)
    with pytest.raises(StructureError):
        describe_model(model)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            StructureSpec("model.decoder", {"self_attn.o_proj": "attention"}),
            r"structure\.layers: .* no module 'model\.decoder'",
        ),
        (
            StructureSpec("model.norm", {"self_attn.o_proj": "attention"}),
            r"structure\.layers: 'model\.norm' is a LlamaRMSNorm",
        ),
        (
            StructureSpec("model.layers", {"self_attn.out": "attention"}),
            r"no layer of 'model\.layers' has a module 'self_attn\.out'",
        ),
        (
            StructureSpec("model.layers", {"self_attn.o_proj": "mixer"}),
            r"structure\.writers\['self_attn\.o_proj'\] must be one of",
        ),
        (
            StructureSpec("model.layers", {"self_attn": "attention"}),
            r"self_attn \(LlamaAttention\) is not a projection",
        ),
        (
            StructureSpec("model.layers", {"mlp.down_proj": "mlp"}, {"self_attn.o_proj": "input_layernorm"}),
            r"structure\.post_norms names 'self_attn\.o_proj', which is not in structure\.writers",
        ),
        (
            StructureSpec("model.layers", {"mlp.down_proj": "mlp"}, {"mlp.down_proj": "post_norm"}),
            r"structure\.post_norms\['mlp\.down_proj'\]: model\.layers\.0 has no module 'post_norm'",
        ),
    ],
)
def test_a_bad_structure_spec_names_what_is_wrong_and_changes_nothing(spec, message):
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        orthogonalize_model_(model, tiny_direction(model), structure=spec)
    assert _same(model, before) and _no_hooks(model)
    with pytest.raises(TypeError, match="structure must be a StructureSpec"):
        describe_model(model, structure={"layers": "model.layers"})


def test_hooks_fall_back_to_each_layers_input_and_output_where_the_sites_cannot_be_read():
    model = tiny_model("llama")
    model.model.layers[0].self_attn.o_proj = _RawMatmul(64, 64)
    direction = tiny_direction(model)
    before = _state(model)
    with pytest.raises(StructureError, match=r"model\.layers\.0\.self_attn\.o_proj \(_RawMatmul\)"):
        orthogonalize_model_(model, direction)
    assert _same(model, before)
    assert _leak(model, direction) > 1e-2
    hooks_before = _hook_count(model)  # transformers keeps hooks of its own for output_hidden_states
    with pytest.warns(UserWarning, match="the hooks ablate each decoder layer's input and output instead"):
        handle = patch(model, direction, mode="hooks")
    assert _leak(model, direction) < 2e-5
    handle.remove()
    assert _hook_count(model) == hooks_before


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _tiny_gemma3_multimodal():
    config = tiny_config("gemma3", transformers.Gemma3ForConditionalGeneration)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return randomize_(transformers.Gemma3ForConditionalGeneration(config).float().eval())


def test_a_multimodal_checkpoint_edits_its_language_model_only_and_reloads_with_its_class(tmp_path):
    model = _tiny_gemma3_multimodal()
    structure = describe_model(model)
    assert structure.layers_name == "model.language_model.layers"
    assert structure.has_post_norms
    direction = torch.randn(structure.hidden_size, generator=torch.Generator().manual_seed(1))
    vision = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model.language_model.")}
    assert any("vision_tower" in k for k in vision) and any("multi_modal_projector" in k for k in vision)
    record = orthogonalize_model_(model, direction)
    assert all(c.name.startswith("model.language_model.") for c in record.changed)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in vision.items() if k != "lm_head.weight")
    assert _leak_of(model, structure, direction) < 1e-4
    out = save_abliterated(model, None, tmp_path / "out", metadata={"layer": 0})
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert type(reloaded) is transformers.Gemma3ForConditionalGeneration
    reloaded_state = reloaded.state_dict()
    assert all(torch.equal(reloaded_state[k], v) for k, v in model.state_dict().items())


def _leak_of(model, structure, direction) -> float:
    states: list[torch.Tensor] = []
    handles = [
        layer.layer.register_forward_pre_hook(
            lambda m, a, k: states.append(a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        for layer in structure.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=IDS)
    finally:
        for h in handles:
            h.remove()
    unit = reference.unit(direction)
    return max(float(((s.float() @ unit).abs() / s.float().norm(dim=-1)).max()) for s in states)
