"""The model card (README.md): rendered from report.json alone, with a header the Hugging Face hub parses.

docs/example-report.json is the report.json of a tiny demo run (`abliterate` with the CLI's tiny-demo
inputs, its command and outputs recorded), and docs/example-model-card.md its README.md. After a
change to the card, write the example again with
`model_card(json.loads(Path("docs/example-report.json").read_text()))`.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from refusal_kernels.cli import build_parser
from refusal_kernels.models.default import DEFAULT_GGUF_NAME
from refusal_kernels.pipeline.abliterate import AbliterationReport
from refusal_kernels.pipeline.card import model_card
from refusal_kernels.pipeline.evaluate import Evaluation
from refusal_kernels.pipeline.prompts import PromptSets
from refusal_kernels.pipeline.report import SCORE_NAMES, DirectionResult, markdown_report

DOCS = Path(__file__).resolve().parents[1] / "docs"
# heretic-style peaks on 4 layers, and the per-layer scales they give, worked out by hand.
TRIAL = {
    "number": 3,
    "direction_index": None,
    "attention": {"max_weight": 1.2, "max_weight_position": 2.0, "min_weight": 0.4, "min_weight_distance": 1.5},
    "mlp": {"max_weight": 0.9, "max_weight_position": 1.0, "min_weight": 0.3, "min_weight_distance": 1.0},
    "norm_preserving": True,
    "projected": True,
}
TRIAL_SCALES = {0: (0.0, 0.3), 1: (0.667, 0.9), 2: (1.2, 0.3), 3: (0.667, 0.0)}


@pytest.fixture
def report() -> dict:
    return json.loads((DOCS / "example-report.json").read_text())


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    header, separator, _ = card.removeprefix("---\n").partition("\n---\n")
    assert separator
    return yaml.safe_load(header)


def code_block(card: str, section: str) -> str:
    """The first ```sh block after the heading `section`."""
    return re.search(r"```sh\n(.*?)\n```", card.split(f"## {section}\n", 1)[1], re.DOTALL).group(1)


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows: first cell -> the other cells."""
    cells = (line.strip("|").split("|") for line in text.splitlines() if line.startswith("| "))
    return {row[0].strip(): [cell.strip() for cell in row[1:]] for row in cells}


def percent(cell: str) -> float:
    assert cell.endswith("%")
    return float(cell[:-1]) / 100


def test_the_header_parses_as_yaml_with_what_the_hub_reads(report):
    assert front_matter(model_card(report)) == {
        "base_model": "tiny-demo",
        "library_name": "transformers",
        "tags": ["abliterated", "refusal-direction"],
    }


@pytest.mark.parametrize(
    ("model", "outputs", "expected"),
    [
        (
            "Qwen/Qwen2.5-0.5B-Instruct",
            ["hf"],
            {"base_model": "Qwen/Qwen2.5-0.5B-Instruct", "library_name": "transformers"},
        ),
        ("/data/models/Llama-3-8B", ["hf", "lora"], {"base_model": "Llama-3-8B", "library_name": "transformers"}),
        ("/data/models/Llama-3-8B", ["lora"], {"base_model": "Llama-3-8B", "library_name": "peft"}),
        ("gguf/model.Q8_0.gguf", ["gguf"], {"base_model": "model.Q8_0.gguf", "library_name": "gguf"}),
        ("checkpoints/run-1/final", ["hf"], {"base_model": "final", "library_name": "transformers"}),
        (
            f"/home/me/.cache/refusal-kernels/{DEFAULT_GGUF_NAME}",
            ["gguf"],
            {"base_model": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "library_name": "gguf", "license": "apache-2.0"},
        ),
        ("/tmp/odd: #name", [], {"base_model": "odd: #name"}),
        ("/tmp/x", None, {"base_model": "x"}),
    ],
)
def test_the_header_names_the_base_model_and_the_library_of_the_outputs(report, model, outputs, expected):
    report |= {"model": model, "outputs": outputs}
    assert front_matter(model_card(report)) == {**expected, "tags": ["abliterated", "refusal-direction"]}


def test_the_table_holds_the_reports_numbers(report):
    report["after"]["harmful_unclear"] = 0.25
    rows = table_rows(model_card(report))
    for key, label in (
        ("harmful_refusal", "refusal rate, harmful"),
        ("harmless_refusal", "over-refusal: refusal rate, harmless"),
    ):
        before, after = map(percent, rows[label])
        assert before == pytest.approx(report["before"][key], abs=5e-4)
        assert after == pytest.approx(report["after"][key], abs=5e-4)
    assert [percent(cell) for cell in rows["unclear (reasoning cut off), harmful"]] == [0.0, 0.25]
    assert rows["KL on harmless"][0] == ""
    assert float(rows["KL on harmless"][1]) == pytest.approx(report["after"]["kl"], abs=5e-5)


def test_the_card_and_report_md_share_the_table(report):
    table = [line for line in markdown_report(report).splitlines() if line.startswith("| ")]
    assert len(table) == 5
    assert "\n".join(table) in model_card(report)


def test_the_card_tells_what_was_done(report):
    card = model_card(report)
    assert "weight orthogonalization" in card and "at scale 1.0" in card
    assert "layer 1 of 4, post-instruction position -1" in card and "variant `difference`" in card
    assert "harmful_train 128, harmless_train 128, harmful_val 487, harmless_val 393" in card
    assert "![scores of the candidate directions over layer x position](heatmaps.png)" in card
    assert "Safety behaviour removed on purpose" in card
    report["mode"] = "hooks"
    assert "weights are unchanged" in model_card(report)


def test_the_command_round_trips_through_the_shell(report):
    report["command"] = ["refusal-kernels", "abliterate", "--model", "my models/it's $HOME", "--out", 'a "b"']
    assert shlex.split(code_block(model_card(report), "Reproduce")) == report["command"]


def test_without_a_command_the_card_gives_one_that_applies_the_saved_direction(report):
    report |= {"command": None, "mode": "hooks", "scale": 0.5}
    card = model_card(report)
    assert "not recorded" in card
    args = build_parser().parse_args(shlex.split(code_block(card, "Reproduce"))[1:])
    assert (args.model, args.direction, args.mode, args.scale) == ("tiny-demo", "direction.pt", "hooks", 0.5)


def test_a_trial_renders_its_schedule(report):
    report |= {"trial": TRIAL, "command": None}
    report["direction"] |= {"layer": 0, "variant": "per-layer projected"}
    card = model_card(report)
    assert "trial 3 of a search" in card and "norm-preserving" in card and "per-layer projected" in card
    assert "layer 0 of" not in card  # per-layer directions have no one layer
    rows = table_rows(card)
    assert {int(layer): tuple(map(float, rows[layer])) for layer in map(str, range(4))} == TRIAL_SCALES
    assert "Other layers: unchanged." not in card
    args = build_parser().parse_args(shlex.split(code_block(card, "Reproduce"))[1:])
    assert args.trial == "SEARCH_OUT:3"
    report["direction"]["n_layers"] = 8
    assert "| 4 |" not in model_card(report) and "Other layers: unchanged." in model_card(report)


def test_the_card_names_the_files_of_each_output(report):
    for outputs, names in ((["gguf"], ["`*.gguf`"]), (["hf", "lora"], ["`config.json`", "`lora/adapter_config.json`"])):
        report["outputs"] = outputs
        files = model_card(report).split("## Files\n", 1)[1]
        assert all(name in files for name in names) and "`report.json`" in files
    report["outputs"] = None
    assert "not recorded" in model_card(report).split("## Files\n", 1)[1]


def small_report() -> AbliterationReport:
    direction = DirectionResult(
        direction=torch.randn(8),
        layer=1,
        position=-1,
        n_layers=2,
        positions=[-2, -1],
        scores={name: torch.rand(2, 2) for name in SCORE_NAMES},
        refusal_tokens=[3],
        prompts={"harmful_train": 2, "harmless_train": 2},
        source="org/model",
    )
    direction.scores["induce"][0, 0] = float("nan")  # unscored cells are NaN in report.json
    before = Evaluation(0.75, 0.125, None, 1.5, ["no"], ["sure"], torch.zeros(1, 4))
    after = Evaluation(0.0, 0.0, 0.0625, 1.75, ["yes"], ["sure"], torch.zeros(1, 4))
    prompts = PromptSets(["harm"], ["help"], ["harm, held out"], ["help, held out"])
    command = ["refusal-kernels", "abliterate", "--model", "org/model", "--out", "out dir"]
    return AbliterationReport(
        "org/model", "weights", 1.0, direction, before, after, prompts, command=command, outputs=["hf"]
    )


def test_save_writes_the_card_from_what_it_writes_to_report_json(tmp_path):
    report = small_report()
    report.save(tmp_path)
    names = {path.name for path in tmp_path.iterdir()}
    assert names == {"direction.pt", "direction.json", "heatmaps.png", "report.json", "report.md", "README.md"}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert (saved["command"], saved["outputs"]) == (report.command, ["hf"])
    card = (tmp_path / "README.md").read_text()
    assert card == model_card(saved)
    assert front_matter(card)["base_model"] == "org/model"


def test_the_example_card_is_what_model_card_renders(report):
    unrendered = copy.deepcopy(report)
    assert (DOCS / "example-model-card.md").read_text() == model_card(report)
    assert report == unrendered  # rendering leaves the report as it was
