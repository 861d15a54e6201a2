"""load_model on tiny local checkpoints; the checkpoints and helpers the saving and streaming tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from test_hf_families import tiny_model

from refusal_kernels.hf import (
    load_model,
    loading,
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


def _gguf(path: Path, matrix_type: str) -> Path:
    """A GGUF holding one [32, 64] matrix in `matrix_type` and one F32 vector."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    kind = gguf.GGMLQuantizationType[matrix_type]
    matrix = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    writer.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(matrix, kind), raw_dtype=kind)
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("matrix_type", "native", "expected"),
    [
        ("Q8_0", True, torch.bfloat16),
        ("Q4_0", True, torch.bfloat16),
        ("Q8_0", False, None),  # bf16 emulated: slower than float32
        ("F32", True, None),  # float weights keep their precision
        ("F16", True, None),
    ],
)
def test_matmul_dtype_is_bf16_for_a_quantized_gguf_where_bf16_is_native(
    tmp_path, monkeypatch, matrix_type, native, expected
):
    monkeypatch.setattr(loading, "multiplies_bf16_natively", lambda device: native)
    assert loading.matmul_dtype(_gguf(tmp_path / "m.gguf", matrix_type)) is expected


def test_matmul_dtype_keeps_a_directorys_own_dtype(source_dir, monkeypatch):
    monkeypatch.setattr(loading, "multiplies_bf16_natively", lambda device: True)
    assert loading.matmul_dtype(source_dir) is None


def test_multiplies_bf16_natively_asks_the_device():
    cpu = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert loading.multiplies_bf16_natively("cpu") == cpu
    assert not loading.multiplies_bf16_natively("meta")


@pytest.mark.parametrize(
    ("flag", "native", "expected"),
    [(None, True, "bfloat16 matmuls, float32 elsewhere"), (None, False, "float32"), ("float32", True, "float32")],
)
def test_the_command_line_runs_a_quantized_ggufs_matmuls_in_bf16_unless_told(
    smollm2_gguf, monkeypatch, capsys, flag, native, expected
):
    from refusal_kernels import cli

    monkeypatch.setattr(loading, "multiplies_bf16_natively", lambda device: native)
    args = cli.build_parser().parse_args(
        ["evaluate", "--model", str(smollm2_gguf), *(["--dtype", flag] if flag else [])]
    )
    _, model, _, _ = cli.load(args)
    assert loading.precision(model) == expected
    assert (f"running in {expected}" in capsys.readouterr().err) == (flag is None and native)
