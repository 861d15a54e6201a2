"""Per-layer scale schedules: Schedule, Peak (heretic's shape), and their use by orthogonalize_model_ and patch."""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_hf_families import tiny_direction, tiny_model
from test_hf_hooks import _forward, _relative_difference

from refusal_kernels.hf import Peak, Schedule, describe_model, orthogonalize_model_, patch


def _state(model) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(before[name], t) for name, t in model.state_dict().items())


@pytest.mark.parametrize(
    ("peak", "n_layers", "expected"),
    [
        # distances 2, 1, 0, 1, 2 from the peak, all within min_weight_distance
        (Peak(1.0, 2.0, 0.5, 2.0), 5, (0.5, 0.75, 1.0, 0.75, 0.5)),
        # distance 3 is exactly min_weight_distance (min_weight); 4 is beyond it (untouched)
        (Peak(2.0, 0.0, 1.0, 3.0), 5, (2.0, 2.0 - 1 / 3, 2.0 - 2 / 3, 1.0, 0.0)),
        # a fractional position: distances 1.5, 0.5, 0.5, 1.5
        (Peak(1.2, 1.5, 0.2, 1.0), 4, (0.0, 0.7, 0.7, 0.0)),
        # heretic's min_weight as a fraction 0.25 of max_weight; distances 2.25, 1.25, 0.25
        (Peak(0.8, 2.25, 0.25 * 0.8, 2.0), 3, (0.0, 0.8 + 1.25 / 2 * (0.2 - 0.8), 0.8 + 0.25 / 2 * (0.2 - 0.8))),
    ],
)
def test_peaked_schedule_follows_heretics_kernel(peak, n_layers, expected):
    schedule = Schedule.peaked(n_layers, attention=peak, mlp=Peak(1.0, 0.0, 0.0, 1.0))
    assert schedule.attention == pytest.approx(expected, abs=1e-12)
    assert schedule.mlp == (1.0, 0.0, 0.0, 0.0, 0.0)[:n_layers]
    assert schedule.embeddings == 0.0


def test_constant_schedule_equals_a_number():
    assert Schedule.constant(3, 0.5) == Schedule((0.5, 0.5, 0.5), [0.5, 0.5, 0.5], 0.5)
    by_number, by_schedule = tiny_model("gpt2"), tiny_model("gpt2")
    direction = tiny_direction(by_number)
    record = orthogonalize_model_(by_number, direction, scale=0.7)
    scheduled = orthogonalize_model_(by_schedule, direction, scale=Schedule.constant(2, 0.7))
    assert [(c.name, c.scale) for c in scheduled.changed] == [(c.name, c.scale) for c in record.changed]
    assert scheduled.untied_head == record.untied_head == "lm_head.weight"
    assert record.scale == 0.7 and scheduled.scale == Schedule.constant(2, 0.7)
    assert all(torch.equal(by_schedule.state_dict()[name], t) for name, t in by_number.state_dict().items())


def test_constant_schedule_hooks_remove_the_direction_as_a_number_does():
    model = tiny_model("llama")
    direction = tiny_direction(model)
    with patch(model, direction):
        by_number = _forward(model)
    with patch(model, direction, scale=Schedule.constant(2, 1.0)):
        by_schedule = _forward(model)
    assert _relative_difference(by_schedule, by_number) < 1e-5


def test_each_writer_gets_its_components_scale_and_zero_leaves_it_bit_identical():
    model = tiny_model("qwen2")  # tied head, biases on q/k/v only
    before = _state(model)
    schedule = Schedule(attention=(0.0, 0.5), mlp=(1.5, 0.0), embeddings=0.0)
    record = orthogonalize_model_(model, tiny_direction(model), scale=schedule)
    scales = {c.name: c.scale for c in record.changed}
    assert scales == {"model.layers.1.self_attn.o_proj.weight": 0.5, "model.layers.0.mlp.down_proj.weight": 1.5}
    assert record.untied_head is None and model.lm_head.weight is model.model.embed_tokens.weight
    state = model.state_dict()
    assert {name for name, t in state.items() if not torch.equal(before[name], t)} == set(scales)


def test_components_follow_the_structure():
    model = tiny_model("qwen2_moe")
    schedule = Schedule(attention=(0.25, 0.5), mlp=(2.0, 3.0), embeddings=0.75)
    record = orthogonalize_model_(model, tiny_direction(model), scale=schedule)
    expected = {w.name: schedule.scale_of(w) for w in describe_model(model).writers()}
    assert {c.name: c.scale for c in record.changed} == expected
    assert expected["model.layers.1.mlp.experts.down_proj"] == 3.0
    assert expected["model.layers.1.mlp.shared_expert.down_proj.weight"] == 3.0
    assert expected["model.layers.0.self_attn.o_proj.weight"] == 0.25
    assert expected["model.embed_tokens.weight"] == 0.75


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe"])
def test_scheduled_hooks_equal_the_scheduled_weight_edit(family):
    model = tiny_model(family)
    direction = tiny_direction(model)
    schedule = Schedule.peaked(2, attention=Peak(1.5, 1.0, 0.5, 1.0), mlp=Peak(0.8, 0.0, 0.2, 0.75), embeddings=0.6)
    assert schedule.attention == (0.5, 1.5) and schedule.mlp == (0.8, 0.0)
    plain = _forward(model)
    with patch(model, direction, scale=schedule, mode="hooks"):
        hooked = _forward(model)
    with patch(model, direction, scale=schedule, mode="weights"):
        weighted = _forward(model)
    with patch(model, direction, mode="hooks"):
        removed = _forward(model)
    difference = _relative_difference(weighted, hooked)
    print(f"{family}: scheduled weights vs hooks relative logit difference {difference:.2e}")
    assert difference < 1e-5
    assert _relative_difference(hooked, plain) > 1e-3 and _relative_difference(hooked, removed) > 1e-3


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Schedule((1.0, math.nan), (1.0, 1.0)), r"Schedule.attention\[1\] must be a finite number"),
        (lambda: Schedule((1.0, 1.0), (1.0, math.inf)), r"Schedule.mlp\[1\] must be a finite number"),
        (lambda: Schedule((1.0,), (1.0, 1.0)), "Schedule.attention has 1 scales and Schedule.mlp has 2"),
        (lambda: Schedule((1.0,), (1.0,), embeddings=math.nan), "Schedule.embeddings must be a finite number"),
        (lambda: Schedule.constant(0, 1.0), "n_layers must be a positive int"),
        (lambda: Peak(1.0, 0.0, 0.5, 0.0), "Peak.min_weight_distance must be > 0"),
        (lambda: Peak(1.0, 0.0, 0.5, -1.0), "Peak.min_weight_distance must be > 0"),
        (lambda: Peak(math.nan, 0.0, 0.5, 1.0), "Peak.max_weight must be a finite number"),
        (lambda: Peak(1.0, math.inf, 0.5, 1.0), "Peak.max_weight_position must be a finite number"),
    ],
)
def test_bad_schedules_raise_value_error_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Schedule("ab", (1.0, 1.0)), "Schedule.attention must be a sequence of numbers"),
        (lambda: Schedule.peaked(2, attention=1.0, mlp=Peak(1.0, 0.0, 0.5, 1.0)), "attention must be a Peak"),
    ],
)
def test_schedules_of_the_wrong_type_raise_type_error(make, message):
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize(
    "call",
    [
        lambda m, s: orthogonalize_model_(m, tiny_direction(m), scale=s),
        lambda m, s: orthogonalize_model_(m, tiny_direction(m), scale=s, undo=True),
        lambda m, s: patch(m, tiny_direction(m), scale=s, mode="weights"),
        lambda m, s: patch(m, tiny_direction(m), scale=s, mode="hooks"),
    ],
)
def test_a_schedule_for_another_layer_count_raises_and_changes_nothing(call):
    model = tiny_model("qwen2")
    before = _state(model)
    message = "Schedule.attention and Schedule.mlp have 3 scales, the model has 2 layers"
    with pytest.raises(ValueError, match=re.escape(message)):
        call(model, Schedule.constant(3, 1.0))
    assert _unchanged(model, before)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
