"""orthogonalize_checkpoint: the streamed edit equals orthogonalize_model_ then save, in about one tensor of memory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from test_hf_families import tiny_direction, tiny_model
from test_hf_loading import _logits, _state, _tokenizer, source_dir  # noqa: F401  (fixture)
from transformers import AutoModelForCausalLM

from refusal_kernels.hf import (
    checkpoint,
    load_model,
    orthogonalize_checkpoint,
    orthogonalize_model_,
    save_abliterated,
)


def test_orthogonalize_checkpoint_equals_orthogonalize_model_then_save(tmp_path, source_dir):  # noqa: F811
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
