"""The command line's evaluation beyond refusal phrases: lm-eval tasks (--tasks, --tasks-path,
--limit) and a model judge (--judge, or --judge-url with --judge-model), before and after, into
report.json, report.md, the model card and `evaluate`'s output; and each bad input refused in one
line before any model loads. The endpoint judge's run against a real server is in
tests/test_pipeline_model_judge.py."""

import json
import socket
from pathlib import Path

import pytest
from test_cli import abliterate, expect_error

from refusal_kernels import cli, hf

pytest.importorskip("lm_eval")

TASKS_PATH = str(Path(__file__).parent / "data" / "lm_eval")
TASKS = ["--tasks", "tiny_topic_copy,tiny_chat_answers", "--tasks-path", TASKS_PATH, "--limit", "3"]


@pytest.fixture
def prompt_files(tmp_path):
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(f"how do i break thing {i}" for i in range(8)))
    harmless.write_text("\n".join(f"please describe nice thing {i}" for i in range(8)))
    return ["--harmful", str(harmful), "--harmless", str(harmless)]


def test_abliterate_scores_the_tasks_and_both_judges_before_and_after(model_dir, prompt_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert abliterate(model_dir, prompt_files, out, *TASKS, "--judge", "tiny-demo") == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())

    capability = report["capability"]
    assert set(capability) == {"before", "after"}
    for scores in capability.values():
        assert set(scores) == {"tiny_topic_copy", "tiny_chat_answers"}
        assert set(scores["tiny_topic_copy"]) == {"acc", "acc_norm"}
        assert 0.0 <= scores["tiny_chat_answers"]["exact_match"]["value"] <= 1.0
        assert scores["tiny_topic_copy"]["acc"]["stderr"] is not None

    judges = report["judges"]
    assert set(judges) == {"before", "after"}
    for when, evaluation in (("before", report["before"]), ("after", report["after"])):
        comparison = judges[when]
        assert comparison["n"] == 4  # the held-out harmful prompts (half of 8)
        assert comparison["substring_refusal_rate"] == evaluation["harmful_refusal"]
        assert comparison["model_judge"] == "tiny-demo"
        assert 0.0 <= comparison["model_refusal_rate"] + comparison["model_unclear_rate"] <= 1.0
        assert len(comparison["examples"]) == min(3, round(comparison["disagreement_rate"] * 4))

    for text in (printed, (out / "report.md").read_text(), (out / "README.md").read_text()):
        assert "Capability benchmarks (lm-eval)" in text and "| tiny_topic_copy | acc |" in text
        assert "Judges on the harmful answers, after the edit" in text


def test_evaluate_scores_the_tasks_and_the_judge_on_the_base_and_the_ablated_model(
    model_dir, prompt_files, tmp_path, capsys
):
    direction_dir = tmp_path / "direction"
    argv = ["direction", "--model", str(model_dir), "--out", str(direction_dir), *prompt_files]
    assert cli.main([*argv, "--layer", "1", "--position", "-1", "--all-prompts"]) == 0
    capsys.readouterr()
    argv = ["evaluate", "--model", str(model_dir), *prompt_files, "--direction", str(direction_dir)]
    assert cli.main([*argv, "--max-new-tokens", "4", *TASKS, "--judge", "tiny-demo"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"base", "ablated", "capability", "judges"}
    assert set(summary["capability"]) == set(summary["judges"]) == {"base", "ablated"}
    assert set(summary["capability"]["ablated"]) == {"tiny_topic_copy", "tiny_chat_answers"}
    assert summary["judges"]["base"]["substring_refusal_rate"] == summary["base"]["harmful_refusal"]


def test_evaluate_without_tasks_or_judge_keeps_its_output(model_dir, prompt_files, capsys):
    assert cli.main(["evaluate", "--model", str(model_dir), *prompt_files, "--max-new-tokens", "2"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"base"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails a test whose command loads a model: each of these inputs must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(hf, "load_model", refuse)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--tasks", "tiny_topic_cpy", "--tasks-path", TASKS_PATH], ["unknown task", "close matches: tiny_topic_copy"]),
        (["--tasks", " , ", "--tasks-path", TASKS_PATH], ["--tasks", "at least one"]),
        (["--tasks", "tiny_topic_copy", "--tasks-path", "/nonexistent/tasks"], ["tasks_path", "does not exist"]),
        (["--tasks-path", TASKS_PATH], ["--tasks-path and --limit go with --tasks"]),
        (["--limit", "3"], ["--tasks-path and --limit go with --tasks"]),
        (["--tasks", "tiny_topic_copy", "--tasks-path", TASKS_PATH, "--limit", "0"], ["--limit must be positive"]),
        (["--judge-model", "m"], ["--judge-model", "--judge-url"]),
        (["--judge-url", "http://127.0.0.1:1"], ["--judge-url needs --judge-model"]),
        (["--judge", "tiny-demo", "--judge-url", "http://127.0.0.1:1", "--judge-model", "m"], ["pass one"]),
    ],
)
@pytest.mark.parametrize("command", ["abliterate", "evaluate"])
def test_bad_assessment_arguments_are_one_line_before_any_model_loads(
    command, extra, fragments, tmp_path, capsys, no_model_loads
):
    out = tmp_path / "out"
    argv = [command, "--model", "tiny-demo", *(["--out", str(out)] if command == "abliterate" else []), *extra]
    expect_error(argv, capsys, *fragments)
    assert not out.exists()


def test_a_tasks_path_without_yaml_files_is_refused(tmp_path, capsys, no_model_loads):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "quiz.yml").write_text("task: quiz\n")
    argv = ["evaluate", "--model", "tiny-demo", "--tasks", "quiz", "--tasks-path", str(tmp_path / "tasks")]
    expect_error(argv, capsys, "holds no *.yaml task file", "rename the *.yml ones")


def test_an_unreachable_judge_endpoint_is_refused_before_any_model_loads(tmp_path, capsys, no_model_loads):
    out = tmp_path / "out"
    argv = ["abliterate", "--model", "tiny-demo", "--out", str(out)]
    expect_error(
        [*argv, "--judge-url", f"http://127.0.0.1:{_free_port()}", "--judge-model", "m"], capsys, "unreachable"
    )
    assert not out.exists()


def test_a_judge_without_a_chat_template_is_refused_before_the_job(model_dir, prompt_files, tmp_path, capsys):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    for template in model_dir.glob("chat_template.*"):
        template.unlink()
    out = tmp_path / "out"
    expect_error(
        ["abliterate", "--model", "tiny-demo", "--out", str(out), "--judge", str(model_dir)], capsys, "chat template"
    )
    assert not out.exists()
