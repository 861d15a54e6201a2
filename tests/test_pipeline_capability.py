"""capability: lm-eval tasks on the model in memory, with hooks or edited weights, and nothing changed after.

The two local tasks in tests/data/lm_eval are written for the tiny demo model: tiny_topic_copy
(multiple choice: which object did the request name) and tiny_chat_answers (generation: the
model's whole answer, its plan for a harmless request and the refusal phrase for a harmful one).
"""

import copy
import random
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from refusal_kernels import hf
from refusal_kernels.hf import families
from refusal_kernels.models import tiny_demo_path, tiny_demo_prompt_sets
from refusal_kernels.pipeline import capability, capture
from refusal_kernels.pipeline.capability import (
    LMEvalMissingError,
    check_tasks,
    comparison_rows,
    markdown_table,
    run_tasks,
    scores_from_lm_eval,
)

pytest.importorskip("lm_eval")

TASKS_PATH = Path(__file__).parent / "data" / "lm_eval"
TASKS = ["tiny_topic_copy", "tiny_chat_answers"]
LIMIT = 6  # every generation row, 6 of the 8 multiple-choice ones


@pytest.fixture(scope="module")
def demo():
    return hf.load_model(str(tiny_demo_path()))


@pytest.fixture(scope="module")
def direction(demo):
    """The demo's refusal direction: the difference of means at layer 2's input, last position."""
    model, tokenizer = demo
    layers = [layer.layer for layer in families.describe_model(model).layers]
    sets = tiny_demo_prompt_sets()
    harmful, harmless = (
        capture.mean_activations(model, layers, tokenizer, prompts[:32], n_positions=1).mean
        for prompts in (sets.harmful, sets.harmless)
    )
    return (harmful - harmless)[2, 0]


@pytest.fixture(scope="module")
def base_scores(demo, tmp_path_factory):
    # From another working directory: the YAML files' data_files still resolve, against tasks_path.
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        scores = run_tasks(*demo, TASKS, tasks_path=TASKS_PATH, limit=LIMIT)
        assert Path.cwd() == elsewhere
    return scores


@pytest.fixture(scope="module")
def hooked_scores(demo, direction):
    with hf.patch(demo[0], direction, mode="hooks"):
        return run_tasks(*demo, TASKS, tasks_path=TASKS_PATH, limit=LIMIT)


def _snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def orthogonalized(demo, direction):
    """The demo with r removed from its weights (its tied head untied), in train mode, with its
    weights, the global generator states and its scores on the tasks around one run_tasks."""
    model = copy.deepcopy(demo[0])
    hf.orthogonalize_model_(model, direction)
    model.train()
    before = _snapshot(model), torch.get_rng_state(), random.getstate()
    scores = run_tasks(model, demo[1], TASKS, tasks_path=TASKS_PATH, limit=LIMIT)
    after = _snapshot(model), torch.get_rng_state(), random.getstate()
    return model, scores, before, after


def _values(scores):
    return {(task, metric): score["value"] for task, metrics in scores.items() for metric, score in metrics.items()}


def test_both_local_tasks_give_numbers_with_stderrs(base_scores):
    assert {task: set(metrics) for task, metrics in base_scores.items()} == {
        "tiny_topic_copy": {"acc", "acc_norm"},
        "tiny_chat_answers": {"exact_match"},
    }
    for metrics in base_scores.values():
        for score in metrics.values():
            assert isinstance(score["value"], float) and isinstance(score["stderr"], float)
    assert 0.0 <= base_scores["tiny_topic_copy"]["acc"]["value"] <= 1.0
    # The targets are the demo's own greedy answers: generation, stopping and decoding work.
    assert base_scores["tiny_chat_answers"]["exact_match"]["value"] == 1.0


def test_hooks_are_scored_as_they_run_and_equal_the_weight_edit(base_scores, hooked_scores, orthogonalized):
    # Without r the three harmful requests are answered, not refused; the harmless answers stay.
    assert hooked_scores["tiny_chat_answers"]["exact_match"]["value"] == 0.5
    # For a Llama (no post-sublayer norms) ablating r at run time is the weight edit.
    assert _values(hooked_scores) == pytest.approx(_values(orthogonalized[1]), abs=1e-6)
    assert _values(hooked_scores) != _values(base_scores)


def test_run_tasks_leaves_the_model_and_the_generators_as_they_were(demo, orthogonalized):
    model, _, (weights, torch_state, python_state), (weights_after, torch_after, python_after) = orthogonalized
    assert weights.keys() == weights_after.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == weights_after[name].dtype and torch.equal(
            tensor.view(torch.uint8), weights_after[name].view(torch.uint8)
        ), name
    # Still untied: HFLM's tie_weights() did not give the edited embedding its head back.
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert all(module.training for module in model.modules())
    assert torch.equal(torch_state, torch_after) and python_state == python_after
    assert not demo[0].training and next(demo[0].parameters()).device.type == "cpu"


class _Unrunnable(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the model ran")


def _refuse_network(*args, **kwargs):
    raise AssertionError("the network was used")


def test_an_unknown_task_lists_close_matches_before_the_model_runs(monkeypatch):
    # The first full index of this process, built here: lm-eval's and tasks_path's, offline.
    monkeypatch.setattr(socket.socket, "connect", _refuse_network)
    monkeypatch.setattr(socket, "create_connection", _refuse_network)
    with pytest.raises(ValueError, match=r"^tasks: unknown task 'tiny_topic_cpy' \(close matches: tiny_topic_copy"):
        run_tasks(_Unrunnable(), None, ["tiny_topic_cpy", "tiny_chat_answers"], tasks_path=TASKS_PATH)
    with pytest.raises(ValueError, match=r"'hellaswg' \(close matches: hellaswag"):
        check_tasks(["hellaswg"])
    assert check_tasks(["hellaswag", *TASKS], TASKS_PATH) == ["hellaswag", *TASKS]


def test_a_tasks_path_without_yaml_files_is_a_value_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no tasks here")
    with pytest.raises(ValueError, match=r"^tasks_path .* holds no \*\.yaml task file$"):
        check_tasks(TASKS, tmp_path)
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "quiz.yml").write_text("task: quiz\n")
    with pytest.raises(ValueError, match=r"^tasks_path .* rename the \*\.yml ones"):
        run_tasks(_Unrunnable(), None, TASKS, tasks_path=tmp_path)


@pytest.mark.parametrize(("name", "problem"), [("missing", "does not exist"), ("notes.txt", "is not a directory")])
def test_a_tasks_path_that_is_no_directory_is_a_value_error(tmp_path, name, problem):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=rf"^tasks_path '.*{name}' {problem}$"):
        check_tasks(TASKS, tmp_path / name)


@pytest.mark.parametrize(
    ("tasks", "error", "message"),
    [
        ("tiny_topic_copy", TypeError, "tasks must be a sequence of lm-eval task names"),
        ([], ValueError, "tasks is empty"),
        (["tiny_topic_copy", 3], TypeError, r"tasks must hold task names \(str\), got \[3\]"),
    ],
)
def test_a_bad_tasks_argument_is_named(tasks, error, message):
    with pytest.raises(error, match=message):
        check_tasks(tasks, TASKS_PATH)


@pytest.mark.parametrize(("option", "value"), [("limit", 0), ("limit", "all"), ("batch_size", 0), ("batch_size", 2.0)])
def test_a_bad_run_option_is_a_value_error_before_the_model_runs(option, value):
    with pytest.raises(ValueError, match=f"^{option} must be"):
        run_tasks(_Unrunnable(), None, TASKS, tasks_path=TASKS_PATH, **{option: value})


def test_tasks_of_tasks_path_alone_are_checked_without_lm_evals_own_index(tmp_path, monkeypatch):
    local = tmp_path / "tasks"
    shutil.copytree(TASKS_PATH, local)
    indexed, built = capability._indexed, []

    def spy(root, include_defaults, stamps):
        built.append((root, include_defaults))
        return indexed(root, include_defaults, stamps)

    monkeypatch.setattr(capability, "_indexed", spy)
    assert check_tasks(TASKS, local) == TASKS
    assert built == [(local.resolve(), False)]
    # lm-eval missing: an ImportError that says what to install (a new task file, a new index).
    (local / "copy.yaml").write_text((local / "topic_copy.yaml").read_text().replace("tiny_topic_copy", "tiny_copy"))
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(LMEvalMissingError, match=r"no module 'lm_eval.tasks'\): pip install refusal-kernels\[eval\]"):
        check_tasks(TASKS, local)


LM_EVAL_RESULTS = {
    "gsm8k": {
        "alias": "gsm8k",
        "exact_match,strict-match": 0.25,
        "exact_match_stderr,strict-match": 0.1,
        "exact_match,flexible-extract": 0.5,
        "exact_match_stderr,flexible-extract": "N/A",
        "sample_len": 8,
    },
    "arc_easy": {"alias": "arc_easy", "acc,none": 0.75, "acc_stderr,none": 0.05, "acc_norm,none": 0.5},
}


def test_lm_eval_results_are_read_per_metric():
    assert scores_from_lm_eval(LM_EVAL_RESULTS) == {
        "gsm8k": {
            "exact_match,strict-match": {"value": 0.25, "stderr": 0.1},
            "exact_match,flexible-extract": {"value": 0.5, "stderr": None},
        },
        "arc_easy": {"acc": {"value": 0.75, "stderr": 0.05}, "acc_norm": {"value": 0.5, "stderr": None}},
    }


def test_comparison_rows_and_the_markdown_table():
    before = scores_from_lm_eval(LM_EVAL_RESULTS)
    after = {"arc_easy": {"acc": {"value": 0.5, "stderr": 0.25}}, "mmlu": {"acc": {"value": 0.4, "stderr": None}}}
    rows = comparison_rows(before, after)
    assert [(row["task"], row["metric"]) for row in rows] == [
        ("gsm8k", "exact_match,strict-match"),
        ("gsm8k", "exact_match,flexible-extract"),
        ("arc_easy", "acc"),
        ("arc_easy", "acc_norm"),
        ("mmlu", "acc"),
    ]
    assert rows[2] == {
        "task": "arc_easy",
        "metric": "acc",
        "before": 0.75,
        "before_stderr": 0.05,
        "after": 0.5,
        "after_stderr": 0.25,
        "delta": -0.25,
    }
    assert rows[3]["after"] is None and rows[3]["delta"] is None and rows[4]["before"] is None
    table = markdown_table(before, after).splitlines()
    assert table[0] == "| task | metric | before | after | change |"
    assert table[4] == "| arc_easy | acc | 0.7500 ± 0.0500 | 0.5000 ± 0.2500 | -0.2500 |"
    assert table[5] == "| arc_easy | acc_norm | 0.5000 | n/a | n/a |"
    assert table[6] == "| mmlu | acc | n/a | 0.4000 | n/a |"
