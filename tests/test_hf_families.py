"""Structure detection on tiny random models of every supported family (no downloads).

The tiny-model builders here are shared by the other tests/test_hf_*.py files.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from refusal_kernels.hf import StructureError, describe_model
from refusal_kernels.hf import families as fam

COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 128}
ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

# family -> (config class, model class, config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**COMMON, **ATTENTION}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**COMMON, **ATTENTION, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, **ATTENTION, "head_dim": 16}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {**COMMON, **ATTENTION, **MOE, "num_experts": 4, "shared_expert_intermediate_size": 64},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**COMMON, **ATTENTION, **MOE, "num_experts": 4}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**COMMON, **ATTENTION}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {**COMMON, **ATTENTION, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**COMMON, **ATTENTION, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**COMMON, **ATTENTION, "pad_token_id": 0}),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64},
    ),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, **ATTENTION, "head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, **ATTENTION, "head_dim": 16}),
}
POST_NORM_FAMILIES = ("gemma2", "gemma3")
PLAIN_FAMILIES = tuple(f for f in FAMILIES if f not in POST_NORM_FAMILIES)


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A seeded fp32 eval-mode model of `family` whose every parameter is random and O(1)-ish.

    Norm weights and biases are randomized too, so that a wrong norm convention or a missed
    bias shows up; all weights are scaled so that activations neither vanish nor explode.
    """
    config_name, model_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.normal_(0.0, 0.3)
                if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    parameter.add_(1.0 if not family.startswith("gemma") else 0.0)
            else:
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
    return model


def tiny_direction(model: nn.Module, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(model.get_input_embeddings().embedding_dim, generator=generator)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_described(family):
    model = tiny_model(family)
    structure = describe_model(model)
    assert len(structure.layers) == 2
    assert structure.hidden_size == 64
    parameters = dict(model.named_parameters())
    for writer in structure.writers():
        assert parameters[writer.name] is writer.parameter
        width = writer.parameter.shape[-2] if writer.layout == fam.MATRIX else writer.parameter.shape[-1]
        assert width == 64, writer.name
    names = {w.name for w in structure.writers()}
    # Every layer writes through its attention and its MLP, each writer labelled with its component.
    for layer in structure.layers:
        assert all(w.layer == layer.index for w in layer.writers)
        assert {w.component for w in layer.writers} == {fam.ATTENTION, fam.MLP}
        assert all((w.component == fam.ATTENTION) == ("attn" in w.name) for w in layer.writers)
    assert {w.component for w in structure.embeddings} == {fam.EMBEDDING}
    assert f"{'transformer.wte' if family == 'gpt2' else 'model.embed_tokens'}.weight" in names
    if family == "gpt2":
        assert {
            "transformer.wpe.weight",
            "transformer.h.0.attn.c_proj.bias",
            "transformer.h.1.mlp.c_proj.weight",
        } <= names
    if family in POST_NORM_FAMILIES:
        assert structure.has_post_norms
        layer = structure.layers[0].layer
        assert [s.module for s in structure.layers[0].sites] == [
            layer.post_attention_layernorm,
            layer.post_feedforward_layernorm,
        ]
    else:
        # post_attention_layernorm is the norm before the MLP here: it writes nothing.
        assert not structure.has_post_norms
        attention = structure.layers[0].layer.attn if family == "gpt2" else structure.layers[0].layer.self_attn
        assert structure.layers[0].sites[0].module is attention


def test_moe_experts_and_shared_experts_are_writers():
    names = {w.name: w for w in describe_model(tiny_model("qwen2_moe")).writers()}
    fused = names["model.layers.0.mlp.experts.down_proj"]
    assert fused.layout == fam.MATRIX and fused.parameter.shape == (4, 64, 32)
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in names
    assert "model.layers.0.mlp.shared_expert_gate.weight" not in names
    mixtral = {w.name for w in describe_model(tiny_model("mixtral")).writers()}
    assert "model.layers.1.mlp.experts.down_proj" in mixtral


def test_transposed_fused_experts_are_ablated_by_rows():
    experts = nn.Module()
    experts.down_proj = nn.Parameter(torch.zeros(4, 32, 64))
    experts.is_transposed = True
    (writer,) = fam._fused_expert_writers(experts, "experts", fam._Context(64, 0, fam.MLP, None))
    assert writer.layout == fam.ROWS
    square = nn.Module()
    square.down_proj = nn.Parameter(torch.zeros(4, 64, 64))
    with pytest.raises(StructureError, match=r"experts\.down_proj"):
        fam._fused_expert_writers(square, "experts", fam._Context(64, 0, fam.MLP, None))


def test_norm_gain_reads_each_family_convention():
    gemma = tiny_model("gemma2").model.layers[0].post_attention_layernorm
    llama = tiny_model("llama").model.layers[0].post_attention_layernorm
    for norm, offset in ((gemma, 1.0), (llama, 0.0)):
        gain = fam.norm_gain(norm)
        expected = norm.weight.detach() + offset
        torch.testing.assert_close(gain / gain.norm(), expected / expected.norm())


class _RawMatmul(nn.Module):
    """A projection no reader knows: a bare parameter, not an nn.Linear."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.randn(d_in, d_out) * d_in**-0.5)

    def forward(self, x):
        return x @ self.matrix


def test_unclassifiable_attention_output_names_the_module():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.o_proj = _RawMatmul(64, 64)
    with pytest.raises(StructureError, match=r"model\.layers\.1\.self_attn\.o_proj \(_RawMatmul\)"):
        describe_model(model)


def test_an_mlp_under_another_shape_is_read_from_the_forward_pass():
    model = tiny_model("llama")
    model.model.layers[0].mlp = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 64))
    (writer,) = (
        w for w in describe_model(model).layers[0].writers if w.component == fam.MLP and w.layout == fam.MATRIX
    )
    assert writer.name == "model.layers.0.mlp.2.weight"
    model.model.layers[0].mlp = nn.Sequential(nn.Linear(64, 32), nn.GELU(), _RawMatmul(32, 64))
    with pytest.raises(StructureError, match=r"model\.layers\.0\.mlp\.2 \(_RawMatmul\)"):
        describe_model(model)


def test_model_whose_forward_fails_is_rejected():
    model = tiny_model("llama")
    model.model.layers = nn.ModuleList([nn.Linear(64, 64)])
    with pytest.raises(StructureError, match=r"LlamaForCausalLM: the forward pass that reads its structure failed"):
        describe_model(model)
