"""hf.loading.cast_matmuls_, the main job's way to run a quantized GGUF: bf16 matmuls over a float32
residual stream, on every architecture orthogonalize_gguf claims (synthetic files, tests/gguf_files.py)."""

from __future__ import annotations

import gguf_files
import pytest
import test_hf_gguf_architectures as gguf_architectures
import torch

from refusal_kernels.hf import describe_model, loading, orthogonalize_model_, patch, verify
from refusal_kernels.hf import gguf as hf_gguf


@pytest.mark.parametrize("arch", hf_gguf.ARCHITECTURES)
def test_cast_matmuls_keeps_the_residual_stream_and_norms_in_float32(tmp_path, arch):
    model = _gguf_model(tmp_path, arch)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    loading.cast_matmuls_(model, torch.bfloat16)
    linears = [module for module in model.modules() if type(module) is torch.nn.Linear]
    assert linears and all(param.dtype == torch.bfloat16 for module in linears for param in module.parameters())
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    norms = [param for name, param in model.named_parameters() if "norm" in name]
    assert norms and all(param.dtype == torch.float32 for param in norms)
    with torch.no_grad():
        out = model(torch.tensor([gguf_architectures.TOKENS]), output_hidden_states=True)
    assert all(state.dtype == torch.float32 for state in out.hidden_states)
    assert loading.precision(model) == "bfloat16 matmuls, float32 elsewhere"


@pytest.mark.parametrize("arch", hf_gguf.ARCHITECTURES)
def test_cast_matmuls_runs_closer_to_float32_than_a_bf16_model(tmp_path, arch):
    tokens = torch.tensor([gguf_architectures.TOKENS * 4])
    outputs = {}
    for name in ("float32", "cast", "bfloat16"):
        model = _gguf_model(tmp_path, arch)
        if name == "cast":
            loading.cast_matmuls_(model, torch.bfloat16)
        elif name == "bfloat16":
            model.to(torch.bfloat16)
        with torch.no_grad():
            outputs[name] = model(tokens, output_hidden_states=True).hidden_states[-1].float()
    error = {name: float((outputs[name] - outputs["float32"]).norm()) for name in ("cast", "bfloat16")}
    assert 0 < error["cast"] < error["bfloat16"], error


@pytest.mark.parametrize("arch", ["llama", "qwen3moe", "gemma3"])
@pytest.mark.parametrize("mode", ["weights", "hooks"])
def test_edits_of_a_cast_model_remove_r_from_the_residual_stream(tmp_path, arch, mode):
    model = _gguf_model(tmp_path, arch)
    loading.cast_matmuls_(model, torch.bfloat16)
    directions = gguf_architectures._directions()
    if mode == "weights":
        orthogonalize_model_(model, directions)  # its self-check passes
    else:
        patch(model, directions)
    structure = describe_model(model)
    expected = verify.expectation(dict(enumerate(directions)), embeddings=True)
    leaks = verify.measure(model, structure, expected)
    assert len(leaks) == 1 + len(structure.layers)
    # Hooks ablate the float32 stream; weights stored in bf16 keep a bf16 rounding of r.
    bound = verify.TOLERANCE[torch.float32 if mode == "hooks" else torch.bfloat16]
    assert max(leak for _, leak, _ in leaks) < bound


def test_cast_matmuls_refuses_bad_input_and_leaves_the_model_alone(tmp_path):
    model = _gguf_model(tmp_path, "llama")
    before = {name: param.clone() for name, param in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
        loading.cast_matmuls_(model, "bfloat16")
    with pytest.raises(TypeError, match="dtype"):
        loading.cast_matmuls_(model, torch.int8)
    model.model.norm.to(torch.float64)
    with pytest.raises(ValueError, match="one floating-point dtype"):
        loading.cast_matmuls_(model, torch.bfloat16)
    model.model.norm.to(torch.float32)
    for name, param in model.state_dict().items():
        assert param.dtype == torch.float32 and torch.equal(param, before[name]), name
    loading.cast_matmuls_(model, torch.bfloat16)
    with pytest.raises(ValueError, match="already runs in bfloat16 matmuls, float32 elsewhere"):
        loading.cast_matmuls_(model, torch.bfloat16)


def _gguf_model(tmp_path, arch: str):
    """A synthetic float32 GGUF of `arch` (tests/gguf_files.py), loaded by transformers."""
    path = gguf_files.write(
        tmp_path / f"{arch}.gguf", writer_type="F32", arch=arch, n_layers=gguf_architectures.N_LAYERS
    )
    return gguf_architectures._load(tmp_path, arch, path.name).eval()
