"""save_abliterated: a checkpoint plain from_pretrained loads, written whole or not at all."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_llama
from gguf_files import write
from test_hf_families import tiny_direction
from test_hf_loading import _logits, _state, _tokenizer, source_dir  # noqa: F401  (fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_kernels.hf import (
    load_model,
    orthogonalize_model_,
    save_abliterated,
    saving,
)
from refusal_kernels.hf.saving import source_dtype


def test_save_abliterated_round_trip(tmp_path, source_dir):  # noqa: F811
    model, tokenizer = load_model(source_dir)
    direction = tiny_direction(model)
    orthogonalize_model_(model, direction)
    expected = _logits(model)
    out = save_abliterated(
        model, tokenizer, tmp_path / "out", metadata={"direction": direction, "layer": 1, "scores": [0.5]}
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=0)
    assert not reloaded.config.tie_word_embeddings
    record = json.loads((out / saving.METADATA_FILE).read_text())
    assert record["layer"] == 1 and record["scores"] == [0.5]
    torch.testing.assert_close(torch.tensor(record["direction"]), direction)
    assert record["source_model"] == str(source_dir)
    chat = [{"role": "user", "content": "w1 w2"}]
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False) == "w1 w2 "
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_save_abliterated_refuses_non_empty_and_source_directories(tmp_path, source_dir):  # noqa: F811
    model, tokenizer = load_model(source_dir)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_abliterated(model, tokenizer, occupied, metadata={})
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    save_abliterated(model, tokenizer, occupied, metadata={}, overwrite=True)
    assert not (occupied / "keep.txt").exists() and (occupied / "config.json").is_file()
    before = sorted(p.name for p in source_dir.iterdir())
    for target in (source_dir, source_dir / "inside", source_dir.parent):
        with pytest.raises(ValueError, match="overlaps the source model directory"):
            save_abliterated(model, tokenizer, target, metadata={}, overwrite=True)
    assert sorted(p.name for p in source_dir.iterdir()) == before


def test_save_abliterated_leaves_nothing_when_interrupted(tmp_path, source_dir, monkeypatch):  # noqa: F811
    model, tokenizer = load_model(source_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_abliterated(model, tokenizer, tmp_path / "out", metadata={})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("writer_type", "expected"), [("Q8_0", torch.bfloat16), ("F16", torch.float16)])
def test_the_source_dtype_of_a_gguf_is_bf16_unless_its_matrices_are_f16(tmp_path, writer_type, expected):
    assert source_dtype(write(tmp_path / "model.gguf", writer_type=writer_type)) == expected


def test_the_source_dtype_of_a_directory_is_its_config_dtype(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "model")
    assert source_dtype(tmp_path / "model") == torch.float32
    assert source_dtype(tmp_path / "nothing-here") is None


def test_save_abliterated_casts_to_the_dtype_asked(tmp_path, tiny_tokenizer):
    model = random_llama(tiny_tokenizer)
    save_abliterated(model, tiny_tokenizer, tmp_path / "out", metadata={}, dtype=torch.bfloat16)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
