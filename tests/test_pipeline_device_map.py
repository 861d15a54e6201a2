"""The pipeline on a model dispatched by accelerate with a device_map: one layer's weights
offloaded to disk (their parameters sit on the meta device and are loaded for each forward
pass). Without several GPUs this is the placement CPU can test; the results must equal those
of the same model loaded whole."""

import pytest
import torch
from test_pipeline_scoring import PROMPTS, REFUSAL_TOKENS
from test_pipeline_select import HARMFUL, HARMLESS

from refusal_kernels import hf
from refusal_kernels.pipeline import evaluate, select
from refusal_kernels.pipeline.scoring import last_token_logits


@pytest.fixture(scope="module")
def offloaded(tiny_llama, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    saved = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(saved)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(
        saved, device_map=device_map, offload_folder=str(tmp_path_factory.mktemp("offload")), dtype=torch.float32
    )
    assert model.model.layers[1].self_attn.o_proj.weight.device.type == "meta"
    return model.eval()


def find(model, tokenizer):
    return select.find_direction(
        model,
        tokenizer,
        HARMFUL,
        HARMLESS,
        harmful_val=PROMPTS[:3],
        harmless_val=PROMPTS[3:],
        refusal_tokens=REFUSAL_TOKENS,
        filter_prompts=False,
        kl_threshold=10.0,
        induce_threshold=-1e9,
        batch_size=8,
    )


def test_find_direction_matches_the_whole_model(tiny_llama, offloaded, tiny_tokenizer):
    whole, dispatched = find(tiny_llama, tiny_tokenizer), find(offloaded, tiny_tokenizer)
    assert (dispatched.layer, dispatched.position) == (whole.layer, whole.position)
    torch.testing.assert_close(dispatched.direction, whole.direction, rtol=1e-5, atol=1e-6)
    for name, scores in whole.scores.items():
        torch.testing.assert_close(dispatched.scores[name], scores, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_hooks_and_evaluation_run_on_the_dispatched_model(tiny_llama, offloaded, tiny_tokenizer):
    direction = torch.randn(tiny_llama.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with hf.patch(tiny_llama, direction):
        expected = last_token_logits(tiny_llama, tiny_tokenizer, PROMPTS, batch_size=2)
    with hf.patch(offloaded, direction):
        got = last_token_logits(offloaded, tiny_tokenizer, PROMPTS, batch_size=2)
        result = evaluate.evaluate(offloaded, tiny_tokenizer, PROMPTS[:2], PROMPTS[2:], max_new_tokens=4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert len(result.harmful_answers) == 2 and len(result.harmless_answers) == 3


def test_weights_mode_refuses_offloaded_writers(offloaded):
    before = offloaded.model.layers[0].self_attn.o_proj.weight.clone()
    with pytest.raises(ValueError, match=r"model\.layers\.1\..* offloaded .* hooks mode"):
        hf.orthogonalize_model_(offloaded, torch.ones(offloaded.config.hidden_size))
    assert torch.equal(offloaded.model.layers[0].self_attn.o_proj.weight, before)
