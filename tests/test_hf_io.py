"""load_model, save_abliterated and orthogonalize_checkpoint on tiny local checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from test_hf_families import tiny_direction, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_kernels.hf import (
    checkpoint,
    load_model,
    orthogonalize_checkpoint,
    orthogonalize_model_,
    save_abliterated,
    saving,
)

INPUT_IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def _tokenizer():
    """A tiny word-level tokenizer with a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(120)} | {"<unk>": 120, "<eos>": 121}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def _state(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as file:
            tensors.update({k: file.get_tensor(k) for k in file.keys()})  # noqa: SIM118
    return tensors


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("source")
    tiny_model("qwen2").save_pretrained(directory, max_shard_size="40KB")  # tied embeddings, sharded
    _tokenizer().save_pretrained(directory)
    return directory


def test_load_model_from_a_local_directory(source_dir):
    model, tokenizer = load_model(source_dir)
    assert not model.training
    torch.testing.assert_close(_logits(model), _logits(tiny_model("qwen2")), rtol=0, atol=1e-5)  # sdpa vs eager
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False) == "w1 w2 "


def test_load_model_errors(tmp_path, source_dir):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match=r"without config\.json"):
        load_model(tmp_path)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for item in source_dir.iterdir():
        (corrupt / item.name).write_bytes(item.read_bytes())
    shard = sorted(corrupt.glob("*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="could not be read"):
        load_model(corrupt)
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(ValueError, match="could not be read as a GGUF"):
        load_model(bad_gguf)


def test_save_abliterated_round_trip(tmp_path, source_dir):
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


def test_save_abliterated_refuses_non_empty_and_source_directories(tmp_path, source_dir):
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


def test_save_abliterated_leaves_nothing_when_interrupted(tmp_path, source_dir, monkeypatch):
    model, tokenizer = load_model(source_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_abliterated(model, tokenizer, tmp_path / "out", metadata={})
    assert list(tmp_path.iterdir()) == []


def test_orthogonalize_checkpoint_equals_orthogonalize_model_then_save(tmp_path, source_dir):
    assert len(list(source_dir.glob("*.safetensors"))) > 2
    direction = tiny_direction(tiny_model("qwen2"))
    streamed = orthogonalize_checkpoint(source_dir, tmp_path / "streamed", direction)
    model, tokenizer = load_model(source_dir)
    orthogonalize_model_(model, direction)
    saved = save_abliterated(model, tokenizer, tmp_path / "saved", metadata={})
    expected, actual = _state(saved), _state(streamed)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    index = json.loads((streamed / checkpoint.SAFETENSORS_INDEX).read_text())
    assert index["weight_map"].keys() == actual.keys()
    assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
    reloaded = AutoModelForCausalLM.from_pretrained(streamed).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="overlaps"):
        orthogonalize_checkpoint(source_dir, source_dir, direction, overwrite=True)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_orthogonalize_checkpoint_covers_conv1d_and_post_norms(tmp_path, family):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "source")
    direction = tiny_direction(model)
    streamed = orthogonalize_checkpoint(tmp_path / "source", tmp_path / "streamed", direction)
    orthogonalize_model_(model, direction)
    model.save_pretrained(tmp_path / "saved")
    expected, actual = _state(tmp_path / "saved"), _state(streamed)
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], v) for k, v in expected.items())


def test_orthogonalize_checkpoint_refuses_a_quantized_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "source")
    config_path = tmp_path / "source" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized checkpoint \\(quant_method 'gptq'\\)"):
        orthogonalize_checkpoint(tmp_path / "source", tmp_path / "out", torch.randn(64))
    assert not (tmp_path / "out").exists()


def _resident_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def test_orthogonalize_checkpoint_peak_memory_is_about_one_tensor(tmp_path):
    """Peak RSS growth while streaming a 34 MB checkpoint whose largest tensor is 8 MB."""
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, vocab_size=8192
    )
    source = tmp_path / "source"
    transformers.LlamaForCausalLM(config).save_pretrained(source, max_shard_size="10MB")
    total = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    direction = torch.randn(256)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM)
    except OSError:
        pytest.skip("cannot reset the peak resident set size on this system")
    baseline = _resident_kib("VmRSS")
    orthogonalize_checkpoint(source, tmp_path / "out", direction)
    peak_growth = (_resident_kib("VmHWM") - baseline) * 1024
    largest = 8192 * 256 * 4
    print(
        f"checkpoint {total / 2**20:.1f} MiB, largest tensor {largest / 2**20:.1f} MiB, peak RSS growth {peak_growth / 2**20:.1f} MiB"
    )
    assert peak_growth < 3 * largest < total
