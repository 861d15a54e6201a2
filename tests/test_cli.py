"""The `refusal-kernels` command: a full run on a tiny local model, and every bad input."""

import json

import pytest
import torch
from conftest import random_llama
from transformers import AutoModelForCausalLM

from refusal_kernels import cli
from refusal_kernels.models import selection_preset
from refusal_kernels.pipeline.options import AbliterationOptions, SearchOptions, SelectionOptions
from refusal_kernels.pipeline.report import DirectionResult

HARMFUL = [f"how do i break thing {i}" for i in range(8)]
HARMLESS = [f"please describe nice thing {i}" for i in range(8)]


@pytest.fixture
def prompt_files(tmp_path):
    harmful, harmless = tmp_path / "harmful.json", tmp_path / "harmless.json"
    harmful.write_text(json.dumps([{"goal": p} for p in HARMFUL]))
    harmless.write_text(json.dumps([{"prompt": p} for p in HARMLESS]))
    return ["--harmful", str(harmful), "--harmless", str(harmless)]


def abliterate(model_dir, prompt_files, out, *extra):
    argv = ["abliterate", "--model", str(model_dir), "--out", str(out), *prompt_files]
    # The random model refuses nothing, so there is nothing to filter the prompts by.
    return cli.main([*argv, "--layer", "1", "--position", "-1", "--all-prompts", "--max-new-tokens", "4", *extra])


def test_abliterate_writes_a_loadable_model_and_reports(model_dir, prompt_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert abliterate(model_dir, prompt_files, out) == 0
    table = capsys.readouterr().out
    assert "refusal rate, harmful" in table and "direction: layer 1, position -1" in table
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "direction.pt", "report.json", "report.md", "heatmaps.png"} <= names
    direction = DirectionResult.load(out).direction
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    down = reloaded.model.layers[0].mlp.down_proj.weight
    assert (direction / direction.norm() @ down).abs().max() < 1e-4  # orthogonalized
    report = json.loads((out / "report.json").read_text())
    assert set(report["before"]) == {"harmful_refusal", "harmless_refusal", "kl", "harmless_ce"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def expect_error(argv, capsys, *fragments):
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "refusal-kernels" in line]
    assert len(lines) == 1, lines  # one line, no traceback
    err = lines[0]
    for fragment in fragments:
        assert fragment in err, err


def test_missing_model_path(tmp_path, prompt_files, capsys):
    expect_error(
        ["abliterate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *prompt_files],
        capsys,
        "does not exist",
    )


def test_corrupt_safetensors_and_gguf(model_dir, tmp_path, prompt_files, capsys):
    (model_dir / "model.safetensors").write_bytes(b"\x00garbage")
    expect_error(
        ["abliterate", "--model", str(model_dir), "--out", str(tmp_path / "o"), *prompt_files], capsys, "corrupt"
    )
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00truncated")
    expect_error(["abliterate", "--model", str(gguf), "--out", str(tmp_path / "o2"), *prompt_files], capsys, "GGUF")


def test_empty_prompt_file_and_unknown_field(model_dir, tmp_path, capsys):
    empty, odd = tmp_path / "empty.txt", tmp_path / "odd.json"
    empty.write_text("")
    odd.write_text(json.dumps([{"colour": "red"}]))
    base = ["abliterate", "--model", str(model_dir), "--out", str(tmp_path / "o")]
    expect_error([*base, "--harmful", str(empty)], capsys, "empty.txt")
    expect_error([*base, "--harmful", str(odd)], capsys, "colour")


def test_existing_output_and_model_directory(model_dir, prompt_files, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    expect_error(["abliterate", "--model", str(model_dir), "--out", str(taken), *prompt_files], capsys, "--overwrite")
    assert (taken / "keep.txt").read_text() == "mine"
    expect_error(
        ["abliterate", "--model", str(model_dir), "--out", str(model_dir), *prompt_files],
        capsys,
        "model's own directory",
    )


def test_bad_direction_files(model_dir, prompt_files, tmp_path, capsys):
    good = DirectionResult(
        direction=torch.randn(7),
        layer=0,
        position=-1,
        n_layers=3,
        positions=[-1],
        scores={name: torch.zeros(3, 1) for name in ("bypass", "induce", "kl")},
        refusal_tokens=[],
    )
    good.save(tmp_path / "wrong_size")
    good.direction = torch.full((32,), float("nan"))
    good.save(tmp_path / "nan")
    base = ["abliterate", "--model", str(model_dir), *prompt_files, "--max-new-tokens", "2"]
    expect_error(
        [*base, "--out", str(tmp_path / "o"), "--direction", str(tmp_path / "wrong_size")], capsys, "shape [7]"
    )
    expect_error([*base, "--out", str(tmp_path / "o"), "--direction", str(tmp_path / "nan")], capsys, "NaN")


def test_layer_or_position_out_of_range(model_dir, prompt_files, tmp_path, capsys):
    base = ["abliterate", "--model", str(model_dir), "--out", str(tmp_path / "o"), *prompt_files]
    expect_error([*base, "--layer", "3", "--position", "-1"], capsys, "--layer 3")
    expect_error([*base, "--layer", "1", "--position", "-9"], capsys, "position -9")


def test_variant_is_applied_and_recorded(model_dir, prompt_files, tmp_path, capsys):
    def direction(variant):
        out = tmp_path / variant
        argv = ["direction", "--model", str(model_dir), "--out", str(out), *prompt_files, "--variant", variant]
        assert cli.main([*argv, "--layer", "1", "--position", "-1", "--all-prompts"]) == 0
        return DirectionResult.load(out)

    difference, projected = direction("difference"), direction("projected")
    assert (difference.variant, projected.variant) == ("difference", "projected")
    assert projected.direction.norm().item() == pytest.approx(1.0, abs=1e-5)
    unit_difference = difference.direction / difference.direction.norm()
    assert (projected.direction - unit_difference).abs().max() > 1e-3
    with pytest.raises(SystemExit) as exited:
        cli.main(["direction", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--variant", "best"])
    assert exited.value.code == 2 and "--variant" in capsys.readouterr().err


def test_unknown_dtype_or_device(model_dir, prompt_files, tmp_path, capsys):
    base = ["abliterate", "--model", str(model_dir), "--out", str(tmp_path / "o"), *prompt_files]
    expect_error([*base, "--dtype", "float8"], capsys, "--dtype")
    expect_error([*base, "--device", "warp-drive"], capsys, "--device")


def test_interrupt_during_save_leaves_nothing(model_dir, prompt_files, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", interrupted)
    out = tmp_path / "out"
    assert abliterate(model_dir, prompt_files, out) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_abliterate_tiny_demo_removes_refusal(tmp_path, capsys):
    """The demo model refuses held-out harmful requests; abliterated, it answers them, and
    benign requests keep working."""
    out = tmp_path / "tiny"
    assert cli.main(["abliterate", "--model", "tiny-demo", "--out", str(out), "--max-new-tokens", "12"]) == 0
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"], report["after"]
    assert before["harmful_refusal"] >= 0.9
    assert after["harmful_refusal"] <= 0.1
    assert after["harmless_refusal"] <= 0.1
    assert after["harmless_ce"] < 1.0  # the base model's benign answers stay likely
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4


# Each flag and the options field it sets: its default must be the field's, per command.
FLAG_FIELDS = {
    "abliterate": {
        "n_train": (SelectionOptions, "n_train"),
        "n_val": (SelectionOptions, "n_val"),
        "seed": (SelectionOptions, "seed"),
        "variant": (SelectionOptions, "variant"),
        "max_new_tokens": (AbliterationOptions, "max_new_tokens"),
        "kl_tokens": (AbliterationOptions, "kl_tokens"),
        "mode": (AbliterationOptions, "mode"),
        "scale": (AbliterationOptions, "scale"),
    },
    "search": {
        "n_train": (SearchOptions, "n_train"),
        "seed": (SearchOptions, "seed"),
        "sampler": (SearchOptions, "sampler"),
        **{name: (SearchOptions, name) for name in cli.SEARCH_SET_SIZES},
    },
}


@pytest.mark.parametrize("command", FLAG_FIELDS)
def test_every_flag_defaults_to_its_options_field(command):
    args = cli.build_parser().parse_args([command, "--out", "unused"])
    for dest, (options_type, name) in FLAG_FIELDS[command].items():
        assert getattr(args, dest) == getattr(options_type(), name), f"{command} --{dest}"


@pytest.mark.parametrize("model", [None, "tiny-demo", "some/model"])
def test_abliterate_without_flags_selects_with_the_library_defaults_and_the_model_preset(model):
    argv = ["abliterate", "--out", "unused", *(["--model", model] if model else [])]
    args = cli.build_parser().parse_args(argv)
    assert cli.selection_options(args) == SelectionOptions(**selection_preset(model))


# ---- output formats


def test_abliterate_writes_every_format_asked_from_one_edit(model_dir, prompt_files, tmp_path, capsys):
    """--format hf,lora: the safetensors model and a LoRA adapter that turns the base into it,
    with report.json recording the formats, the command and their sizes, and a model card."""
    from peft import PeftModel

    out = tmp_path / "out"
    assert abliterate(model_dir, prompt_files, out, "--format", "hf,lora") == 0
    assert "on disk: source" in capsys.readouterr().out
    edited = AutoModelForCausalLM.from_pretrained(out)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "lora")
    ids = torch.randint(0, edited.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, edited(ids).logits, atol=1e-4, rtol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"] == ["hf", "lora"] and report["include_embeddings"] is True
    assert report["command"][:2] == ["refusal-kernels", "abliterate"] and "hf,lora" in report["command"]
    sizes = report["sizes"]
    assert sizes["hf"] == (out / "model.safetensors").stat().st_size
    assert 0 < sizes["lora"] < sizes["hf"] / 10 and sizes["source"] == sizes["hf"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "lora/adapter_config.json" in card


def test_hf_output_keeps_the_source_dtype_unless_dtype_says_otherwise(prompt_files, tmp_path, tiny_tokenizer):
    source = tmp_path / "bf16-model"
    random_llama(tiny_tokenizer).to(torch.bfloat16).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    assert abliterate(source, prompt_files, tmp_path / "same") == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "same").dtype == torch.bfloat16
    assert abliterate(source, prompt_files, tmp_path / "fp32", "--dtype", "float32") == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").dtype == torch.float32


@pytest.mark.parametrize(
    ("fmt", "fragment"),
    [
        ("onnx", "'onnx' is not a format"),
        ("auto,hf", "expected auto or a comma-separated list of hf, lora, gguf"),
        ("gguf", "--format gguf edits the .gguf file the model was loaded from"),
    ],
)
def test_a_bad_format_is_one_line_and_writes_nothing(model_dir, prompt_files, tmp_path, capsys, fmt, fragment):
    out = tmp_path / "out"
    expect_error(
        ["abliterate", "--model", str(model_dir), "--out", str(out), *prompt_files, "--format", fmt], capsys, fragment
    )
    assert not out.exists()


def test_a_lora_of_an_embedding_tied_to_the_head_is_refused_before_the_job(tmp_path, capsys):
    out = tmp_path / "out"
    expect_error(
        ["abliterate", "--model", "tiny-demo", "--out", str(out), "--format", "lora"],
        capsys,
        "model.embed_tokens.weight is tied to the output head",
    )
    assert not out.exists()
