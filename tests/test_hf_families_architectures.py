"""Every decoder family in the installed transformers: edited correctly, or refused with a message.

One test per family of transformers' causal-LM registry and its image-text-to-text registry,
on a tiny random model (tests/tiny_configs.py) whose norm weights and biases are random too, so
that where a norm sits matters. For each family, in fp32:

  * hooks mode and weights mode each leave every residual state (each decoder layer's input and
    the last layer's output) orthogonal to r, to 1e-4 of the state's norm, or raise
    StructureError (ResidualLeakError included) and leave the model as it was;
  * remove() restores the logits and every tensor bit for bit, and undo_ restores the weights;
  * weights mode changes no tensor outside the language model's residual writers (the vision
    tower and projector of a multimodal checkpoint are byte-identical);
  * where no norm follows a sublayer, hooks and weights mode give the same logits.

A family that finishes an edit with r still in its residual stream fails its test: that is
the silently wrong outcome, which must not exist. Run this file as a script for the table the
README quotes (`python tests/test_hf_families_architectures.py`).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_configs import NOT_SHRUNK, UNBUILDABLE, randomize_, tiny_config

from refusal_kernels import reference
from refusal_kernels.hf import StructureError, orthogonalize_model_, patch, undo_
from refusal_kernels.hf import families as fam
from refusal_kernels.hf.hooks import hook_structure

CAUSAL, IMAGE_TEXT = "causal-lm", "image-text-to-text"
REGISTRIES = {CAUSAL: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, IMAGE_TEXT: MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}
ORTHOGONAL = 1e-4  # the largest |h . r̂| / ||h|| a correct edit leaves in fp32
IDS = torch.tensor([[5, 17, 33, 42, 90, 41, 7, 12, 101, 64]])

# Families whose causal-LM entry is not a decoder-only language model: skipped, with the reason.
ENCODER_ONLY = [
    "bert",
    "bert-generation",
    "big_bird",
    "camembert",
    "data2vec-text",
    "electra",
    "ernie",
    "megatron-bert",
    "rembert",
    "roberta",
    "roberta-prelayernorm",
    "roc_bert",
    "roformer",
    "xlm",
    "xlm-roberta",
    "xlm-roberta-xl",
    "xlnet",
]
ENCODER_DECODER = [
    "bart",
    "bigbird_pegasus",
    "blenderbot",
    "blenderbot-small",
    "marian",
    "mbart",
    "mvp",
    "pegasus",
    "plbart",
    "prophetnet",
    "trocr",
]
AUDIO_FIRST = ["musicgen", "musicgen_melody", "moshi", "moss_transcribe_diarize", "whisper"]
SKIPPED = {
    **{(CAUSAL, t): "encoder-only: its ForCausalLM is a BERT-style encoder run as a decoder" for t in ENCODER_ONLY},
    **{(CAUSAL, t): "encoder-decoder: the causal-LM entry is the decoder half" for t in ENCODER_DECODER},
    **{(CAUSAL, t): "audio- or speech-first" for t in AUDIO_FIRST},
    **{(IMAGE_TEXT, t): "encoder-decoder" for t in ("florence2", "t5gemma2", "vision-encoder-decoder", "udop")},
}

# Families whose two modes differ with no post-sublayer norm, and why (relative logit difference measured here).
HOOKS_DIFFER_FROM_WEIGHTS = {
    "zamba2": "its hybrid layers also read the embeddings themselves, concatenated to the residual stream, which "
    "weights mode orthogonalizes and hooks mode does not (2.1e-2)",
}


def _model_class(registry: str, model_type: str):
    name = REGISTRIES[registry][model_type]
    return getattr(transformers, name if isinstance(name, str) else name[0])


def build(registry: str, model_type: str) -> torch.nn.Module:
    cls = _model_class(registry, model_type)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(tiny_config(model_type, cls)).float().eval()
    return randomize_(model)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        output = model(input_ids=IDS, use_cache=False)
    return (output.logits if hasattr(output, "logits") else output[0]).float()


def _leak(model, direction) -> float:
    """max over residual states of |h . r̂| / ||h||: each decoder layer's input and the last one's output."""
    layers = [layer.layer for layer in hook_structure(model).layers]
    states: list[torch.Tensor] = []

    def keep(value):
        states.append((value if isinstance(value, torch.Tensor) else value[0]).detach().float().clone())

    handles = [
        layer.register_forward_pre_hook(lambda m, a, k: keep(a[0] if a else k["hidden_states"]), with_kwargs=True)
        for layer in layers
    ]
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: keep(out)))
    try:
        _logits(model)
    finally:
        for handle in handles:
            handle.remove()
    unit = reference.unit(direction)
    return max(float(((s @ unit).abs() / s.norm(dim=-1).clamp_min(1e-12)).max()) for s in states)


def _tensors(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()}


def _unchanged(model, before: dict[str, torch.Tensor], except_names=()) -> list[str]:
    after = model.state_dict(keep_vars=True)
    return [n for n, t in before.items() if n not in except_names and not torch.equal(after[n].detach(), t)]


def _no_hooks_left(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _mode(model, direction, mode: str, before: dict[str, torch.Tensor], logits: torch.Tensor) -> str:
    """'correct', or 'refused: <message>'; asserts everything else the module docstring lists."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = patch(model, direction, mode=mode)
    except StructureError as error:
        assert str(error), "a refusal must say why"
        assert not _unchanged(model, before) and _no_hooks_left(model), "a refusal must leave the model as it was"
        return f"refused: {str(error).splitlines()[0]}"
    try:
        leak = _leak(model, direction)
        assert leak <= ORTHOGONAL, f"{mode} mode finished, but r is {leak:.2%} of a residual state: silently wrong"
        patched = _logits(model)
        if mode == "weights":
            writers = {t for w in fam.describe_model(model).writers() for t in (w.name,)}
            head = (
                {n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight}
                if model.get_output_embeddings() is not None
                else set()
            )
            outside = _unchanged(model, before, writers | head)
            assert not outside, f"weights mode changed tensors that write nothing: {outside[:3]}"
    finally:
        handle.remove()
    assert torch.equal(_logits(model), logits) and not _unchanged(model, before) and _no_hooks_left(model)
    return "correct", patched


def outcome(registry: str, model_type: str) -> tuple[str, str]:
    """(kind, detail): 'correct' in both modes, 'hooks only' (weights refused), or 'refused'."""
    model = build(registry, model_type)
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(model.get_input_embeddings().embedding_dim, generator=generator)
    before, logits = _tensors(model), _logits(model)
    hooks = _mode(model, direction, "hooks", before, logits)
    weights = _mode(model, direction, "weights", before, logits)
    if isinstance(weights, str):
        return ("hooks only", weights) if not isinstance(hooks, str) else ("refused", hooks)
    assert not isinstance(hooks, str), f"hooks mode refused where weights mode works: {hooks}"
    structure = fam.describe_model(model)
    if not structure.has_post_norms:
        difference = float((weights[1] - hooks[1]).norm() / hooks[1].norm())
        if model_type in HOOKS_DIFFER_FROM_WEIGHTS:
            assert difference > 1e-4, f"{model_type} is listed in HOOKS_DIFFER_FROM_WEIGHTS but its modes agree"
        else:
            assert difference < 1e-4, f"hooks and weights logits differ by {difference:.2e} with no post-sublayer norm"
    record = orthogonalize_model_(model, direction, undo=True)
    undo_(record)
    after = model.state_dict(keep_vars=True)
    for name, tensor in before.items():
        torch.testing.assert_close(after[name].detach(), tensor, rtol=1e-5, atol=1e-6, msg=f"undo_ left {name} changed")
    return "correct", ""


def skip_reason(registry: str, model_type: str) -> str | None:
    """Why a family is not tested: not a decoder, not buildable on text alone, or not yet shrunk."""
    if (registry, model_type) in SKIPPED:
        return SKIPPED[registry, model_type]
    for table, kind in ((UNBUILDABLE, "cannot be built here"), (NOT_SHRUNK, "no tiny config yet")):
        reason = table.get(f"{registry}:{model_type}") or table.get(model_type)
        if reason:
            return f"{kind}: {reason}"
    return None


CASES = [
    pytest.param(
        registry,
        model_type,
        id=f"{registry}:{model_type}",
        marks=pytest.mark.skip(reason=skip_reason(registry, model_type)) if skip_reason(registry, model_type) else (),
    )
    for registry, names in REGISTRIES.items()
    for model_type in names
    # A family in both registries under one class is tested once.
    if registry == CAUSAL or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) != names[model_type]
]


@pytest.mark.parametrize(
    ("model_type", "sites"),
    [
        # Layers of mixed kinds: each layer's token mixer and MLP, found under any name, with their kind.
        ("qwen3_next", [["linear_attn:attention", "mlp:mlp"], ["self_attn:attention", "mlp:mlp"]]),
        ("nemotron_h", [["mixer:attention"], ["mixer:mlp"], ["mixer:attention"], ["mixer:mlp"]]),
        ("lfm2", [["conv:attention", "feed_forward:mlp"], ["self_attn:attention", "feed_forward:mlp"]]),
        ("jamba", [["mamba:attention", "feed_forward:mlp"], ["self_attn:attention", "feed_forward:mlp"]]),
        # Post-sublayer norms under three sets of names.
        ("olmo2", [["post_attention_layernorm:attention", "post_feedforward_layernorm:mlp"]] * 2),
        ("glm4", [["post_self_attn_layernorm:attention", "post_mlp_layernorm:mlp"]] * 2),
        ("gemma2", [["post_attention_layernorm:attention", "post_feedforward_layernorm:mlp"]] * 2),
        # A parallel block: both sublayers read the same norm's output.
        ("gptj", [["attn:attention", "mlp:mlp"]] * 2),
    ],
)
def test_sites_are_read_with_their_kind(model_type, sites):
    structure = fam.describe_model(build(CAUSAL, model_type))
    read = [[f"{s.name.rsplit('.', 1)[-1]}:{s.component}" for s in layer.sites] for layer in structure.layers]
    assert read == sites


@pytest.mark.parametrize(("registry", "model_type"), CASES)
def test_family_is_edited_correctly_or_refused(registry, model_type):
    kind, detail = outcome(registry, model_type)
    print(f"{registry}:{model_type}: {kind} {detail}")


def print_tally(classify) -> None:
    """One line per case of CASES, then the count of each outcome: classify(registry, model_type)
    gives (kind, detail) for a case that is not skipped."""
    counts: dict[str, list[str]] = {}
    for case in CASES:
        registry, model_type = case.values
        if case.marks:
            kind, detail = "skipped", case.marks[0].kwargs["reason"]
        else:
            kind, detail = classify(registry, model_type)
        counts.setdefault(kind, []).append(model_type)
        print(f"{registry}:{model_type}: {kind} {detail}", flush=True)
    with contextlib.suppress(BrokenPipeError):
        for kind, names in counts.items():
            print(f"{kind}: {len(names)}: {' '.join(names)}")


def _classified(registry: str, model_type: str) -> tuple[str, str]:
    try:
        return outcome(registry, model_type)
    except AssertionError as error:
        return "SILENTLY WRONG", str(error).splitlines()[0]
    except Exception as error:
        return "error", f"{type(error).__name__}: {str(error)[:150]}"


if __name__ == "__main__":
    print_tally(_classified)
