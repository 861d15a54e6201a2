"""orthogonalize_gguf on every architecture it claims (hf.gguf.ARCHITECTURES), each on a small
synthetic file of its own (tests/gguf_files.py).

transformers loads the output with the weights `orthogonalize_model_` gives the model it loads
from the source (Gemma's writers behind their post-sublayer norms included); in a block format
every writer, each MoE expert on its own, is the fp32 edit up to the format's rounding; every
tensor that is not a residual writer is kept byte for byte; and llama.cpp (where installed) runs
each output as transformers runs the `orthogonalize_model_` edit.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_files import D_FF, D_FF_EXPERT, D_MODEL, HEAD_DIM, POST_NORMS, write
from llama_cpp_runner import load_llama
from test_hf_gguf import RELATIVE_RMS_BOUND, _values

from refusal_kernels import reference
from refusal_kernels.hf import StructureError, orthogonalize_gguf, orthogonalize_model_
from refusal_kernels.hf import gguf as hf_gguf

N_LAYERS = 2
# Config fields transformers' GGUF reader maps no key to, so it would leave them at the config
# class's defaults (sized for the real models): passed to from_pretrained instead. Gemma's
# queries: llama.cpp scales them by 1/sqrt(head_dim) (as the real models' 256 does).
TRANSFORMERS_OVERRIDES = {
    "qwen3": {"head_dim": HEAD_DIM},
    "qwen2moe": {"moe_intermediate_size": D_FF_EXPERT, "shared_expert_intermediate_size": D_FF},
    "qwen3moe": {"moe_intermediate_size": D_FF_EXPERT},
    "gemma2": {"query_pre_attn_scalar": HEAD_DIM},
    "gemma3": {"query_pre_attn_scalar": HEAD_DIM},
}
TOKENS = [1, 2, 3, 4]
# llama.cpp's logits (fp32 KV cache) against transformers', as a fraction of the edit's own
# change to them: fp32 rounding, and for Gemma ggml's fp16 GELU table, with room.
LOGITS_BOUND = 0.01
WRITER = re.compile(r"token_embd\.weight|blk\.(?P<layer>\d+)\.(?P<kind>attn_output|ffn_down(?:_exps|_shexp)?)\.weight")
POST_NORM_OF = {"attn_output": "post_attention_norm"}  # every ffn_down* is behind post_ffw_norm


def _directions() -> torch.Tensor:
    """One direction per layer, [N_LAYERS, D_MODEL]."""
    return torch.randn(N_LAYERS, D_MODEL, generator=torch.Generator().manual_seed(1))


def _edits_embeddings(arch: str) -> bool:
    return arch not in hf_gguf.HEAD_ALWAYS_TIED


def _load(directory, arch: str, file_name: str) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=file_name, **TRANSFORMERS_OVERRIDES.get(arch, {})
    )


def _both_edits(tmp_path, arch: str) -> tuple[transformers.PreTrainedModel, dict[str, torch.Tensor]]:
    """Writes src.gguf (F32, of `arch`) and out.gguf, orthogonalize_gguf's edit of it; returns the
    model transformers loads from src.gguf, edited by orthogonalize_model_ with the same
    directions, and its state dict before that edit."""
    src = write(tmp_path / "src.gguf", writer_type="F32", arch=arch, n_layers=N_LAYERS)
    include_embeddings = _edits_embeddings(arch)
    orthogonalize_gguf(src, tmp_path / "out.gguf", _directions(), include_embeddings=include_embeddings)
    expected = _load(tmp_path, arch, "src.gguf")
    original = {name: tensor.detach().clone() for name, tensor in expected.state_dict().items()}
    orthogonalize_model_(expected, _directions(), include_embeddings=include_embeddings)
    return expected, original


@pytest.mark.parametrize("arch", hf_gguf.ARCHITECTURES)
def test_transformers_loads_the_output_with_the_weights_orthogonalize_model_gives(tmp_path, arch):
    expected, original = _both_edits(tmp_path, arch)
    loaded = _load(tmp_path, arch, "out.gguf")
    assert list(loaded.state_dict()) == list(expected.state_dict())
    changed = []
    for (name, want), got in zip(expected.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=name)
        changed += [name] if not torch.equal(want, original.get(name, want)) else []
    assert any("down_proj" in name for name in changed) and any("o_proj" in name for name in changed)
    # The head keeps the original embedding, untied or (gemma2) never edited.
    torch.testing.assert_close(loaded.lm_head.weight, original["model.embed_tokens.weight"], atol=0, rtol=0)


@pytest.mark.parametrize("arch", hf_gguf.ARCHITECTURES)
def test_llama_cpp_runs_the_output_as_transformers_runs_orthogonalize_models_edit(tmp_path, arch):
    llama_cpp = pytest.importorskip("llama_cpp")
    expected, _ = _both_edits(tmp_path, arch)
    tokens = torch.tensor([TOKENS])
    with torch.no_grad():
        want = expected(tokens).logits[0].numpy()
        before = _load(tmp_path, arch, "src.gguf")(tokens).logits[0].numpy()
    f32 = llama_cpp.GGML_TYPE_F32
    model = load_llama(tmp_path / "out.gguf", n_ctx=16, logits_all=True, type_k=f32, type_v=f32, verbose=False)
    model.eval(TOKENS)
    got = np.asarray(model.scores[: len(TOKENS)])
    assert np.abs(got - want).max() < LOGITS_BOUND * np.abs(want - before).max()


def _expected(reader: gguf.GGUFReader, tensor, direction: torch.Tensor) -> torch.Tensor:
    """The fp32 edit of a writer: embedding rows ablated; each matrix (each expert of a stack)
    orthogonalized against its layer's direction, times the stored gain of the norm after it."""
    match = WRITER.fullmatch(tensor.name)
    if match["layer"] is None:
        return reference.ablate(_values(tensor), direction[0] / direction[0].norm())
    layer = int(match["layer"])
    unit = direction[layer]
    if reader.fields["general.architecture"].contents() in POST_NORMS:
        norm_name = f"blk.{layer}.{POST_NORM_OF.get(match['kind'], 'post_ffw_norm')}.weight"
        unit = unit * _values(next(t for t in reader.tensors if t.name == norm_name)).reshape(-1)
    unit = unit / unit.norm()
    experts = _values(tensor).reshape(-1, D_MODEL, int(tensor.shape[0]))
    return (experts - unit[:, None] * (unit @ experts)[:, None, :]).reshape(-1, int(tensor.shape[0]))


@pytest.mark.parametrize("arch", hf_gguf.ARCHITECTURES)
def test_only_the_writers_change_each_expert_edited_on_its_own_in_its_block_format(tmp_path, arch):
    src = write(tmp_path / "src.gguf", writer_type="Q8_0", arch=arch, n_layers=N_LAYERS)
    direction = _directions()
    include_embeddings = _edits_embeddings(arch)
    edit = orthogonalize_gguf(
        src, tmp_path / "out.gguf", direction, include_embeddings=include_embeddings, feedback_passes=0
    )
    original, edited = gguf.GGUFReader(src), gguf.GGUFReader(edit.path)
    writers = [
        t.name
        for t in original.tensors
        if WRITER.fullmatch(t.name) and (include_embeddings or t.name != "token_embd.weight")
    ]
    assert edit.changed == dict.fromkeys(writers, "Q8_0")
    assert [t.name for t in edited.tensors] == [t.name for t in original.tensors] + ["output.weight"] * edit.untied_head
    for old, new in zip(original.tensors, edited.tensors, strict=False):
        assert (new.tensor_type, list(new.shape)) == (old.tensor_type, list(old.shape)), old.name
        if old.name not in edit.changed:
            assert np.array_equal(old.data, new.data), old.name
            continue
        error = (_values(new) - _expected(original, old, direction)).norm() / _values(old).norm()
        assert error < RELATIVE_RMS_BOUND["Q8_0"], old.name


def test_gemma2s_embeddings_are_refused_since_llama_cpp_reads_its_head_from_them(tmp_path):
    src = write(tmp_path / "src.gguf", arch="gemma2")
    with pytest.raises(StructureError, match=r"llama\.cpp's gemma2 always reads its output head from token_embd"):
        orthogonalize_gguf(src, tmp_path / "out.gguf", _directions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


def test_llama_cpp_refuses_a_gemma2_file_with_its_own_head(tmp_path):
    pytest.importorskip("llama_cpp")
    untied = write(tmp_path / "untied.gguf", arch="gemma2", tied=False)
    with pytest.raises(ValueError, match="Failed to load model"):
        load_llama(untied, n_ctx=16, verbose=False)
