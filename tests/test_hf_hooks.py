"""patch (hooks and weights modes), add_direction and orthogonalize_model_ on tiny models."""

from __future__ import annotations

import pytest
import torch
from test_hf_families import FAMILIES, PLAIN_FAMILIES, POST_NORM_FAMILIES, tiny_direction, tiny_model

from refusal_kernels import reference
from refusal_kernels.hf import add_direction, describe_model, orthogonalize_model_, patch

# Left-padded batch: the second row starts with three pad tokens.
INPUT_IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12], [0, 0, 0, 64, 3, 99, 21, 8]])
ATTENTION_MASK = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
# Gemma 2/3 in weights mode differ from hooks mode (see refusal_kernels.hf.weights): the largest
# relative logit difference measured on these tiny models, with margin.
POST_NORM_LOGIT_BOUND = 0.25


def _forward(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits


def _residual_states(model) -> list[torch.Tensor]:
    """Every residual-stream state: each layer's input and the final norm's input."""
    states: list[torch.Tensor] = []
    structure = describe_model(model)
    handles = [
        s.layer.register_forward_pre_hook(
            lambda m, a, k: states.append(a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        for s in structure.layers
    ]
    handles.append(structure.layers[-1].layer.register_forward_hook(lambda m, a, out: states.append(out)))
    try:
        _forward(model)
    finally:
        for h in handles:
            h.remove()
    return [s.clone() for s in states]


def _max_relative_projection(states, direction) -> float:
    unit = reference.unit(direction)
    return max(float(((s.float() @ unit).abs() / s.float().norm(dim=-1).clamp_min(1e-6)).max()) for s in states)


def _relative_difference(a, b) -> float:
    mask = ATTENTION_MASK.bool()
    return float((a[mask] - b[mask]).norm() / b[mask].norm())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["hooks", "weights"])
def test_every_residual_state_is_orthogonal_to_the_direction(family, mode):
    model = tiny_model(family)
    direction = tiny_direction(model)
    assert _max_relative_projection(_residual_states(model), direction) > 1e-2  # the check can fail
    with patch(model, direction, mode=mode):
        states = _residual_states(model)
        assert len(states) == len(describe_model(model).layers) + 1
        assert _max_relative_projection(states, direction) < 2e-5
        # transformers' own hidden_states (all but the last, which is after the final norm) agree.
        with torch.no_grad():
            hidden = model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, output_hidden_states=True).hidden_states
        assert _max_relative_projection(hidden[:-1], direction) < 2e-5


@pytest.mark.parametrize("family", PLAIN_FAMILIES)
def test_weights_mode_equals_hooks_mode_on_a_padded_batch_and_in_generate(family):
    model = tiny_model(family)
    direction = tiny_direction(model)
    with torch.no_grad():
        plain_tokens = model.generate(INPUT_IDS, attention_mask=ATTENTION_MASK, max_new_tokens=6, do_sample=False)
    with patch(model, direction, mode="hooks"):
        hooked_logits = _forward(model)
        with torch.no_grad():
            hooked_tokens = model.generate(INPUT_IDS, attention_mask=ATTENTION_MASK, max_new_tokens=6, do_sample=False)
    with patch(model, direction, mode="weights"):
        weights_logits = _forward(model)
        with torch.no_grad():
            weights_tokens = model.generate(INPUT_IDS, attention_mask=ATTENTION_MASK, max_new_tokens=6, do_sample=False)
    assert _relative_difference(weights_logits, hooked_logits) < 1e-5
    assert torch.equal(weights_tokens, hooked_tokens)
    assert _relative_difference(hooked_logits, _forward(model)) > 1e-3  # the patch did something
    del plain_tokens


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_post_norm_families_weights_mode_stays_close_to_hooks_mode(family):
    model = tiny_model(family)
    direction = tiny_direction(model)
    with patch(model, direction, mode="hooks"):
        hooked = _forward(model)
    with patch(model, direction, mode="weights"):
        weighted = _forward(model)
    difference = _relative_difference(weighted, hooked)
    print(f"{family}: weights vs hooks relative logit difference {difference:.4f}")
    assert 0 < difference < POST_NORM_LOGIT_BOUND
    # Orthogonalizing against r itself, ignoring the norm's gain, leaves r in the residual.
    structure = describe_model(model)
    with torch.no_grad():
        for layer in structure.layers:
            for writer in layer.writers:
                writer.parameter.copy_(reference.orthogonalize(writer.parameter, direction))
    assert _max_relative_projection(_residual_states(model)[1:], direction) > 1e-3


@pytest.mark.parametrize("mode", ["hooks", "weights"])
@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma2"])
def test_remove_restores_outputs_bit_for_bit(family, mode):
    model = tiny_model(family)
    direction = tiny_direction(model)
    before = _forward(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    handle = patch(model, direction, mode=mode)
    assert not torch.equal(_forward(model), before)
    handle.remove()
    handle.remove()
    assert torch.equal(_forward(model), before)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert model.config.tie_word_embeddings == tied


def test_per_layer_directions_and_layer_subsets():
    model = tiny_model("llama")
    directions = torch.stack([tiny_direction(model, seed) for seed in (3, 4)])
    with patch(model, directions):
        states = _residual_states(model)
    assert _max_relative_projection(states[:1], directions[0]) < 2e-5
    assert _max_relative_projection(states[1:], directions[1]) < 2e-5
    with patch(model, directions[0], layers=[1]):
        states = _residual_states(model)
    assert _max_relative_projection(states[:1], directions[0]) > 1e-2
    assert _max_relative_projection(states[1:], directions[0]) < 2e-5


def test_add_direction_shifts_the_layer_input_by_alpha_r():
    model = tiny_model("mistral")
    direction = tiny_direction(model) * 3.0
    before = _residual_states(model)
    with add_direction(model, direction, layer=1, alpha=0.5):
        after = _residual_states(model)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(after[1] - before[1], (0.5 * direction).expand_as(after[1]), rtol=0, atol=1e-5)
    assert torch.equal(_residual_states(model)[1], before[1])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: patch(m, torch.ones(63)), "direction must have shape"),
        (lambda m: patch(m, torch.ones(3, 64)), "direction must have shape"),
        (lambda m: patch(m, torch.zeros(64)), "direction must be finite and non-zero"),
        (lambda m: patch(m, torch.ones(64, dtype=torch.int64)), "direction must have a floating-point dtype"),
        (lambda m: patch(m, torch.ones(63), mode="weights"), "direction must have shape"),
        (lambda m: orthogonalize_model_(m, torch.ones(65)), "direction must have shape"),
        (lambda m: patch(m, torch.ones(64), mode="neither"), "mode must be one of"),
        (lambda m: patch(m, torch.ones(64), layers=[2]), "layers holds"),
        (lambda m: patch(m, torch.ones(64), scale=float("nan")), "scale must be a finite"),
        (lambda m: add_direction(m, torch.ones(64), layer=5), "layer must be an int"),
        (lambda m: add_direction(m, torch.ones(2, 64), layer=0), "direction must be a 1-D"),
    ],
)
def test_bad_arguments_raise_and_change_nothing(call, message):
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=message):
        call(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_orthogonalize_model_records_every_changed_tensor_and_unties_the_head():
    model = tiny_model("qwen2")  # tied embeddings
    head_before = model.lm_head.weight.detach().clone()
    record = orthogonalize_model_(model, tiny_direction(model))
    assert record.untied_head == "lm_head.weight"
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, head_before)
    assert not model.config.tie_word_embeddings
    names = [c.name for c in record.changed]
    assert names[0] == "model.embed_tokens.weight"
    assert {"model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= set(names)
    assert all(c.shape == tuple(model.get_parameter(c.name).shape) for c in record.changed)


def test_hooks_work_under_torch_compile():
    model = tiny_model("llama")
    direction = tiny_direction(model)
    with patch(model, direction, mode="hooks"):
        eager = _forward(model)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
        with torch.no_grad():
            logits = compiled(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
