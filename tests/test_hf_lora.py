"""export_lora: a rank-1 PEFT adapter that, loaded onto the unedited model, is orthogonalize_model_'s edit.

For each family with dense writers, `PeftModel.from_pretrained(base, adapter)` gives the logits
of `orthogonalize_model_(base, ...)` and `merge_and_unload()` its weights, for constant scales,
a Schedule, one direction per layer, `layers=` and with or without the embeddings; the adapter
holds one vector per side of each edited matrix, and the model it was exported from is left
bit for bit as it was. What PEFT cannot express is refused, naming the writer, before anything
is written.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_hf_families import tiny_direction, tiny_model
from test_hf_families_architectures import CAUSAL, IMAGE_TEXT, build
from test_hf_hooks import _forward, _relative_difference
from test_hf_weights_quantized import GPTQLinear, _quantize_writers
from tiny_configs import randomize_, tiny_config
from tolerances import TOLERANCES

from refusal_kernels import hf
from refusal_kernels.hf import Peak, Schedule, export_lora, orthogonalize_model_
from refusal_kernels.hf import lora as lora_module
from refusal_kernels.models import tiny_demo_path

peft = pytest.importorskip("peft")

# The relative logit difference allowed: fp32 differs only in summation order; in bf16 the edited
# weights and the adapter's output are each rounded to bf16 once.
LOGIT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _untied_gpt2() -> torch.nn.Module:
    """GPT-2 with its own head: Conv1D writers with biases, and token and learned position embeddings."""
    config = tiny_config("gpt2")
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    return randomize_(transformers.GPT2LMHeadModel(config).eval())


def _untied(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with an output head of its own, so that its token embedding is exported too."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def _tiny_demo() -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_demo_path(), local_files_only=True).eval()


# family -> a tiny model; what each adds is in its comment.
BUILDERS = {
    "llama": lambda: tiny_model("llama"),
    "qwen2": lambda: tiny_model("qwen2"),  # tied head
    "qwen3": lambda: tiny_model("qwen3"),
    "mistral": lambda: tiny_model("mistral"),
    "gemma": lambda: tiny_model("gemma"),
    "phi3": lambda: tiny_model("phi3"),
    "gpt2": lambda: tiny_model("gpt2"),  # Conv1D [d_in, d_model] writers with biases, tied head
    "gemma2": lambda: tiny_model("gemma2"),  # post-sublayer (sandwich) norms: writers use normalize(g * r)
    "gemma3": lambda: tiny_model("gemma3"),
    "gemma3_untied": lambda: _untied(tiny_model("gemma3")),  # a scaled token embedding: PEFT applies its embed_scale
    "olmo2": lambda: build(CAUSAL, "olmo2"),  # post-sublayer norms, untied head
    "gpt_neox": lambda: build(CAUSAL, "gpt_neox"),  # nn.Linear writers with biases, untied head
    "gpt2_untied": _untied_gpt2,  # Conv1D, biases, token and position embeddings
    "tiny_demo": _tiny_demo,  # the shipped demo model, tied head
}
# Families run under every setting; the others under the first.
CORE = ("llama", "gpt2", "gemma2", "olmo2", "gpt_neox", "gpt2_untied")
PEAKED = {"attention": Peak(1.5, 1.0, 0.5, 1.0), "mlp": Peak(-0.5, 0.0, 2.0, 0.5), "embeddings": 0.3}
# setting -> export_lora's keyword arguments for a model of n layers.
SETTINGS = {
    "scale 1": lambda n: {},
    "scale 0.7 without embeddings": lambda n: {"scale": 0.7, "include_embeddings": False},
    "peaked schedule with a zero": lambda n: {"scale": Schedule.peaked(n, **PEAKED)},
    "layers=[1]": lambda n: {"layers": [1], "scale": 1.3},
}
CASES = [(f, "scale 1") for f in BUILDERS] + [(f, s) for f in CORE for s in list(SETTINGS)[1:]]


@functools.cache
def _model(family: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BUILDERS[family]()


def _tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()}


def _assert_unchanged(model, snapshot: dict[str, torch.Tensor], tied: bool) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys()
    for name, tensor in now.items():
        assert torch.equal(tensor.view(torch.uint8), snapshot[name].view(torch.uint8)), name
    assert _tied(model) == tied and model.config.tie_word_embeddings == tied


def _load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def _assert_same_model(base, path, edited) -> None:
    """The adapter on a copy of `base` gives `edited`'s logits, active and merged, and merging gives its weights."""
    dtype = base.dtype
    expected = _forward(edited)
    adapted = _load(base, path)
    assert _relative_difference(_forward(adapted), expected) < LOGIT_TOLERANCE[dtype]
    merged = adapted.merge_and_unload()
    assert _relative_difference(_forward(merged), expected) < LOGIT_TOLERANCE[dtype]
    merged_weights, edited_weights = merged.state_dict(), edited.state_dict()
    assert merged_weights.keys() == edited_weights.keys()
    for name, tensor in edited_weights.items():
        torch.testing.assert_close(merged_weights[name], tensor, **TOLERANCES[dtype], msg=name)


def _expected_size(record) -> int:
    """One vector per side of each edited tensor: d_model + d_in for a matrix, rows + d_model for
    a row layout ([d_in, d_model] Conv1D, [vocab, d_model] embeddings), d_model for a bias."""
    return sum(sum(change.shape) if len(change.shape) == 2 else change.shape[0] for change in record.changed)


def _module_names(record) -> tuple[str, ...]:
    return tuple(dict.fromkeys(change.name.rsplit(".", 1)[0] for change in record.changed))


def _check_export(model, direction, tmp_path, **kwargs):
    """Export, check the model is untouched and the adapter the size of its edits; returns both and the edited copy."""
    before, tied = _snapshot(model), _tied(model)
    exported = export_lora(model, direction, tmp_path / "adapter", **kwargs)
    _assert_unchanged(model, before, tied)
    edited = copy.deepcopy(model)
    record = orthogonalize_model_(edited, direction, verify=False, **kwargs)  # export_lora verified it
    assert exported.rank == 1
    assert exported.target_modules == _module_names(record)
    assert exported.n_parameters == _expected_size(record)
    saved = load_file(exported.path / lora_module.ADAPTER_WEIGHTS_FILE)
    assert sum(t.numel() for t in saved.values()) == exported.n_parameters
    assert exported.bytes_on_disk == sum(f.stat().st_size for f in exported.path.iterdir())
    for key, tensor in saved.items():
        if "lora_" in key:
            assert tensor.dtype == torch.float32
            assert 1 in tensor.shape and tensor.dim() == 2, key
    return exported, edited


@pytest.mark.parametrize(("family", "setting"), CASES)
def test_the_adapter_gives_the_orthogonalized_model(family, setting, tmp_path):
    model = _model(family)
    kwargs = SETTINGS[setting](len(hf.describe_model(model).layers))
    if _tied(model):
        kwargs["include_embeddings"] = False  # refused, see test_an_embedding_tied_to_the_head_is_refused
    exported, edited = _check_export(model, tiny_direction(model), tmp_path, **kwargs)
    _assert_same_model(model, exported.path, edited)


@pytest.mark.parametrize("family", ["llama", "gpt2_untied", "gpt_neox"])
def test_the_adapter_gives_the_orthogonalized_model_in_bfloat16(family, tmp_path):
    model = copy.deepcopy(_model(family)).to(torch.bfloat16)
    exported, edited = _check_export(model, tiny_direction(model), tmp_path, scale=0.8)
    _assert_same_model(model, exported.path, edited)


def test_one_direction_per_layer(tmp_path):
    model = _model("gpt2_untied")
    layers = len(hf.describe_model(model).layers)
    directions = torch.randn(layers, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    exported, edited = _check_export(model, directions, tmp_path)
    _assert_same_model(model, exported.path, edited)


def test_adapter_config_is_a_rank_1_lora_of_the_exact_modules(tmp_path):
    model = _model("tiny_demo")
    exported = export_lora(model, tiny_direction(model), tmp_path / "adapter", include_embeddings=False)
    config = json.loads((exported.path / lora_module.ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 1 and config["lora_alpha"] == 1 and not config["use_rslora"]
    assert config["base_model_name_or_path"] == model.config._name_or_path == str(tiny_demo_path())
    assert sorted(config["target_modules"]) == sorted(exported.target_modules)
    assert len(exported.target_modules) == 2 * model.config.num_hidden_layers
    assert not (exported.path / "refusal_kernels.json").exists()


def test_biases_are_folded_in_as_the_edited_bias(tmp_path):
    model = _model("gpt_neox")
    exported = export_lora(model, tiny_direction(model), tmp_path / "adapter")
    config = json.loads((exported.path / lora_module.ADAPTER_CONFIG_FILE).read_text())
    assert config["bias"] == "lora_only" and not config["fan_in_fan_out"]
    saved = load_file(exported.path / lora_module.ADAPTER_WEIGHTS_FILE)
    biases = [key for key in saved if key.endswith(".base_layer.bias")]
    assert len(biases) == 2 * model.config.num_hidden_layers


def test_metadata_is_saved_beside_the_adapter(tmp_path):
    model = _model("llama")
    direction = tiny_direction(model)
    exported = export_lora(model, direction, tmp_path / "adapter", metadata={"direction": direction, "layer": 1})
    record = json.loads((exported.path / "refusal_kernels.json").read_text())
    assert record["layer"] == 1 and record["direction"] == pytest.approx(direction.tolist())
    assert "refusal_kernels_version" in record


def test_an_existing_out_dir_needs_overwrite(tmp_path):
    model = _model("llama")
    direction = tiny_direction(model)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_lora(model, direction, out)
    assert [f.name for f in out.iterdir()] == ["keep.txt"]
    export_lora(model, direction, out, overwrite=True)
    assert sorted(f.name for f in out.iterdir()) == sorted(
        [lora_module.ADAPTER_CONFIG_FILE, lora_module.ADAPTER_WEIGHTS_FILE]
    )
    assert [f.name for f in tmp_path.iterdir()] == ["adapter"]  # no temporary directory left


BAD_ARGUMENTS = {
    "direction not a tensor": ({"direction": [1.0] * 64}, TypeError, "direction must be a torch.Tensor"),
    "direction of the wrong size": ({"direction": torch.ones(63)}, ValueError, "direction must have shape"),
    "zero direction": ({"direction": torch.zeros(64)}, ValueError, "finite and non-zero"),
    "scale not finite": ({"scale": float("nan")}, ValueError, "scale must be a finite number"),
    "schedule of the wrong length": ({"scale": Schedule((1.0,), (1.0,))}, ValueError, "the model has 2 layers"),
    "layer out of range": ({"layers": [2]}, ValueError, "outside"),
    "metadata not a mapping": ({"metadata": ["x"]}, TypeError, "metadata must be a mapping"),
    "nothing to export": ({"layers": [], "include_embeddings": False}, ValueError, "nothing to export"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_raise_before_anything_is_written(case, tmp_path):
    model = _model("llama")
    arguments, error, message = BAD_ARGUMENTS[case]
    arguments = {"direction": tiny_direction(model), **arguments}
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        export_lora(model, out_dir=tmp_path / "adapter", **arguments)
    _assert_unchanged(model, before, tied=False)
    assert not any(tmp_path.iterdir())


def _refused(model, tmp_path, message: str, **kwargs) -> None:
    before, tied = _snapshot(model), _tied(model)
    with pytest.raises(ValueError, match=message):
        export_lora(model, tiny_direction(model), tmp_path / "adapter", **kwargs)
    _assert_unchanged(model, before, tied)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ("qwen2_moe", r"model\.layers\.0\.mlp\.experts\.down_proj is a fused 3-D expert parameter"),
        # JetMoE's MoE adds a bias of its own, outside any projection.
        ("jetmoe", r"model\.layers\.0\.mlp\.bias \(JetMoeMoE\) is not the weight or bias of an nn\.Linear"),
        (
            "mamba",
            r"backbone\.layers\.0\.mixer\.out_proj is named out_proj, which PEFT's LoRA refuses to wrap in a mamba model",
        ),
    ],
)
def test_writers_peft_cannot_express_are_refused_by_name(family, message, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family) if family == "qwen2_moe" else build(CAUSAL, family)
    _refused(model, tmp_path, message, include_embeddings=False)


def test_peft_refuses_a_lora_on_a_mamba_out_proj():
    """Why the refusal: PEFT will not wrap it, so the adapter could not be loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(CAUSAL, "mamba")
    config = peft.LoraConfig(r=1, lora_alpha=1, target_modules=["backbone.layers.0.mixer.out_proj"])
    with pytest.raises(ValueError, match="incompatible with Mamba-based models"):
        peft.get_peft_model(model, config)


@pytest.mark.parametrize(
    ("registry", "family", "message"),
    [
        # A weight-less RMSNorm on the rows looked up: PEFT would add its lookup after the norm.
        (IMAGE_TEXT, "muse_glimmer", r"model\.language_model\.embed_tokens \(MuseGlimmerTextNormedEmbedding\)"),
        # Given the attention mask, it looks its rows up at the positions plus an offset.
        (CAUSAL, "opt", r"model\.decoder\.embed_positions \(OPTLearnedPositionalEmbedding\)"),
    ],
)
def test_embeddings_that_do_more_than_a_lookup_are_refused(registry, family, message, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _untied(build(registry, family))
    _refused(model, tmp_path, message + " computes more than a lookup of its rows")


def test_conv1d_among_linear_writers_is_refused(tmp_path):
    model = copy.deepcopy(_model("gpt2"))
    conv1d = model.transformer.h[1].mlp.c_proj
    linear = torch.nn.Linear(conv1d.nx, conv1d.nf)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.T)
        linear.bias.copy_(conv1d.bias)
    model.transformer.h[1].mlp.c_proj = linear
    _refused(
        model,
        tmp_path,
        r"transformer\.h\.0\.attn\.c_proj is a Conv1D among nn\.Linear writers",
        include_embeddings=False,
    )


def test_quantized_writers_are_refused_by_name(tmp_path):
    model = _quantize_writers(_model("llama"), GPTQLinear)
    _refused(model, tmp_path, r"model\.layers\.0\.self_attn\.o_proj \(gptq\): a quantized writer")


def test_an_embedding_tied_to_the_head_is_refused(tmp_path):
    _refused(_model("qwen2"), tmp_path, r"model\.embed_tokens\.weight is tied to the output head")
    _refused(_model("gpt2"), tmp_path, r"transformer\.wte\.weight is tied to the output head")


def test_peft_merges_an_embedding_lora_into_a_tied_head():
    """Why the refusal: merging an embedding LoRA of a tied model changes the head as well."""
    model = copy.deepcopy(_model("qwen2"))
    head = model.get_output_embeddings().weight.detach().clone()
    config = peft.LoraConfig(r=1, lora_alpha=1, target_modules=["model.embed_tokens"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft.get_peft_model(model, config).merge_and_unload()
    assert not torch.equal(merged.get_output_embeddings().weight, head)


def test_out_dir_inside_the_source_model_is_refused():
    model = _model("tiny_demo")
    with pytest.raises(ValueError, match="overlaps the source model directory"):
        export_lora(model, tiny_direction(model), tiny_demo_path() / "adapter", include_embeddings=False)
    assert not (tiny_demo_path() / "adapter").exists()


def test_missing_peft_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    model = _model("llama")
    with pytest.raises(ImportError, match="pip install peft"):
        export_lora(model, tiny_direction(model), tmp_path / "adapter")
    assert not any(tmp_path.iterdir())


def test_export_lora_is_exported_from_hf():
    assert hf.export_lora is export_lora and hf.LoRAExport is lora_module.LoRAExport
