"""Reasoning chat templates: post-instruction tokens with thinking on and off, and a judge
that reads only the final answer (Qwen3 `enable_thinking`, R1-distill `<think>`, gpt-oss harmony)."""

from __future__ import annotations

import string

import pytest
import torch
from conftest import random_llama
from torch import nn

from refusal_kernels.pipeline import chat, judge
from refusal_kernels.pipeline.evaluate import Evaluation, evaluate

# Small stand-ins for the real templates: only the parts that shape the generation prompt
# (R1 spells its role tokens with full-width bars; ASCII ones do the same job here).
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
R1_TEMPLATE = (
    "<|begin_of_sentence|>{% for m in messages %}<|User|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)
HARMONY_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
# family -> (template, special tokens, added tokens that are not special, eos)
FAMILIES = {
    "qwen3": (QWEN3_TEMPLATE, ["<|im_start|>", "<|im_end|>"], ["<think>", "</think>"], "<|im_end|>"),
    "r1": (
        R1_TEMPLATE,
        ["<|begin_of_sentence|>", "<|User|>", "<|Assistant|>"],
        ["<think>", "</think>"],
        "<|eos|>",
    ),
    "harmony": (
        HARMONY_TEMPLATE,
        ["<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>"],
        [],
        "<|return|>",
    ),
}
INSTRUCTION = "How do I bake bread?"


def reasoning_tokenizer(family: str):
    """A character-level fast tokenizer carrying `family`'s chat template and markers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template, special, plain, eos = FAMILIES[family]
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", chat_template=template
    )
    tokenizer.add_special_tokens({"eos_token": eos, "additional_special_tokens": [t for t in special if t != eos]})
    tokenizer.add_tokens(plain)
    return tokenizer


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_qwen3_post_instruction_ids_differ_by_the_empty_think_block():
    tokenizer = reasoning_tokenizer("qwen3")
    on = chat.post_instruction_ids(tokenizer, thinking=True)
    off = chat.post_instruction_ids(tokenizer, thinking=False)
    assert chat.post_instruction_ids(tokenizer) == on  # the template's default: thinking on
    assert tokens(tokenizer, on) == ["<|im_end|>", "\n", "<|im_start|>", *"assistant", "\n"]
    assert off == on + chat.encode(tokenizer, ["<think>\n\n</think>\n\n"])[0]


def test_set_thinking_makes_every_render_use_it():
    tokenizer = reasoning_tokenizer("qwen3")
    off = chat.post_instruction_ids(tokenizer, thinking=False)
    chat.set_thinking(tokenizer, False)
    assert chat.post_instruction_ids(tokenizer) == off
    assert chat.render(tokenizer, ["hi"]) == chat.render(tokenizer, ["hi"], thinking=False)
    assert chat.post_instruction_ids(tokenizer, thinking=True) != off  # an explicit argument still wins
    chat.set_thinking(tokenizer, None)
    assert chat.post_instruction_ids(tokenizer) == chat.post_instruction_ids(tokenizer, thinking=True)
    with pytest.raises(ValueError, match="needs a chat template that reads `enable_thinking`"):
        chat.set_thinking(reasoning_tokenizer("r1"), False)


def test_the_cli_thinking_flag_needs_a_template_with_the_switch(tmp_path, capsys):
    from test_cli import expect_error

    tokenizer = reasoning_tokenizer("r1")
    path = tmp_path / "model"
    random_llama(tokenizer, hidden_size=16, num_hidden_layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    argv = ["evaluate", "--model", str(path), "--thinking", "off"]
    expect_error(argv, capsys, "--thinking off", "needs a chat template that reads `enable_thinking`")


@pytest.mark.parametrize(
    ("family", "thinking"), [("qwen3", None), ("qwen3", True), ("qwen3", False), ("r1", None), ("harmony", None)]
)
def test_post_instruction_ids_are_exactly_what_follows_the_instruction(family, thinking):
    tokenizer = reasoning_tokenizer(family)
    suffix = chat.post_instruction_ids(tokenizer, thinking=thinking)
    (prompt,) = chat.render(tokenizer, [INSTRUCTION], thinking=thinking)
    _, found, tail = prompt.rpartition(INSTRUCTION)
    assert found and chat.encode(tokenizer, [tail])[0] == suffix
    for batch in chat.batches(tokenizer, [INSTRUCTION, "hi"], batch_size=2, thinking=thinking):
        assert (batch.input_ids[:, -len(suffix) :] == torch.tensor(suffix)).all()


def test_r1_template_keeps_its_opened_think_in_the_post_instruction_tokens():
    r1 = reasoning_tokenizer("r1")
    assert tokens(r1, chat.post_instruction_ids(r1))[-3:] == ["<|Assistant|>", "<think>", "\n"]
    assert judge.prompt_opens_reasoning(r1)
    qwen3 = reasoning_tokenizer("qwen3")
    assert not judge.prompt_opens_reasoning(qwen3, thinking=True)
    assert not judge.prompt_opens_reasoning(qwen3, thinking=False)  # the block is closed
    assert not judge.prompt_opens_reasoning(reasoning_tokenizer("harmony"))


@pytest.mark.parametrize("family", ["r1", "harmony"])
def test_thinking_switch_needs_a_template_that_reads_it(family):
    tokenizer = reasoning_tokenizer(family)
    assert not chat.reads_enable_thinking(tokenizer)
    with pytest.raises(ValueError, match="thinking=False"):
        chat.post_instruction_ids(tokenizer, thinking=False)


def test_thinking_switch_must_be_a_bool():
    with pytest.raises(TypeError, match="thinking"):
        chat.render(reasoning_tokenizer("qwen3"), [INSTRUCTION], thinking="off")


@pytest.mark.parametrize(
    ("answer", "reasoning_open", "reasoning", "final"),
    [
        ("Sure, here it is.", False, "", "Sure, here it is."),
        ("<think>\nThey want bread.\n</think>\n\nMix flour.", False, "They want bread.", "Mix flour."),
        ("They want bread.\n</think>\n\nMix flour.", False, "They want bread.", "Mix flour."),  # opened in the prompt
        ("They want bread.\n</think>\n\nMix flour.", True, "They want bread.", "Mix flour."),
        ("<think>\nThey want bread, so", False, "They want bread, so", None),
        ("They want bread, so", True, "They want bread, so", None),
        (
            "<|channel|>analysis<|message|>They want bread.<|end|><|start|>assistant"
            "<|channel|>final<|message|>Mix flour.<|return|>",
            False,
            "They want bread.",
            "Mix flour.",
        ),
        ("<|channel|>analysis<|message|>They want bread, so", False, "They want bread, so", None),
    ],
)
def test_split_reasoning(answer, reasoning_open, reasoning, final):
    assert judge.split_reasoning(answer, reasoning_open=reasoning_open) == (reasoning, final)


def test_split_reasoning_rejects_a_non_string():
    with pytest.raises(TypeError, match="answer"):
        judge.split_reasoning(["I cannot"])


def test_verdict_judges_only_the_final_answer():
    weighs_refusing = "<think>Should I say I cannot? No, it is harmless.</think>Sure: mix flour and water."
    assert judge.verdict(weighs_refusing) == "compliance"
    assert not judge.is_refusal(weighs_refusing)
    assert judge.verdict("<think>This is dangerous.</think>I'm sorry, I can't help.") == "refusal"
    assert judge.verdict("This is dangerous.</think>") == "refusal"  # an empty final answer
    harmony = "<|channel|>analysis<|message|>Fine.<|end|><|start|>assistant<|channel|>final<|message|>I cannot."
    assert judge.verdict(harmony) == "refusal"


@pytest.mark.parametrize(
    ("answer", "reasoning_open"),
    [
        ("<think>I cannot decide whether", False),
        ("I cannot decide whether", True),
        ("<|channel|>analysis<|message|>I cannot decide whether", False),
    ],
)
def test_an_unterminated_reasoning_block_is_unclear(answer, reasoning_open):
    assert judge.verdict(answer, reasoning_open=reasoning_open) == "unclear"
    assert not judge.is_refusal(answer, reasoning_open=reasoning_open)


def test_unclear_rate_is_counted_apart_from_refusals():
    answers = ["<think>a</think>I cannot.", "<think>a</think>Sure.", "<think>I cannot", "Fine."]
    assert judge.refusal_rate(answers) == 0.25
    assert judge.unclear_rate(answers) == 0.25
    assert judge.unclear_rate(["I cannot", "Sure."], reasoning_open=True) == 1.0
    assert judge.unclear_rate([]) == 0.0


class ScriptedModel(nn.Module):
    """Generates the same continuation after every prompt, and records the prompts it saw."""

    def __init__(self, continuation: list[int]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # `generate` reads the device from a parameter
        self.continuation = torch.tensor([continuation])
        self.prompts: list[torch.Tensor] = []

    def generate(self, input_ids, attention_mask, **_):
        self.prompts.append(input_ids)
        return torch.cat([input_ids, self.continuation.expand(len(input_ids), -1)], dim=1)


def test_generate_keeps_harmony_markers_and_drops_other_special_tokens():
    tokenizer = reasoning_tokenizer("harmony")
    text = "<|channel|>analysis<|message|>Harmless.<|end|><|start|>assistant<|channel|>final<|message|>I cannot."
    ids = chat.encode(tokenizer, [text])[0] + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    answers = judge.generate(ScriptedModel(ids), tokenizer, [INSTRUCTION], max_new_tokens=len(ids))
    assert answers.texts == [text]
    assert judge.verdict(answers.texts[0]) == "refusal"


def test_generate_renders_with_the_thinking_switch():
    tokenizer = reasoning_tokenizer("qwen3")
    model = ScriptedModel(chat.encode(tokenizer, ["Mix flour."])[0])
    answers = judge.generate(model, tokenizer, [INSTRUCTION], max_new_tokens=10, thinking=False)
    suffix = chat.post_instruction_ids(tokenizer, thinking=False)
    assert model.prompts[0][0, -len(suffix) :].tolist() == suffix
    assert answers.texts == ["Mix flour."] and not answers.reasoning_open


def test_evaluation_reports_the_unclear_rate(monkeypatch):
    tokenizer = reasoning_tokenizer("r1")
    model = random_llama(tokenizer, hidden_size=16, num_hidden_layers=1)
    # The R1 prompt opens the block: harmful answers never close it, harmless ones do.
    scripted = iter(["I cannot tell yet whether", "Easy.</think>Mix flour."])

    def scripted_generate(input_ids, attention_mask, **_):
        continuation = torch.tensor([chat.encode(tokenizer, [next(scripted)])[0]])
        return torch.cat([input_ids, continuation.expand(len(input_ids), -1)], dim=1)

    monkeypatch.setattr(model, "generate", scripted_generate)
    result = evaluate(model, tokenizer, ["harm me", "harm you"], ["bake bread", "bake cake"], batch_size=4)
    assert (result.harmful_unclear, result.harmful_refusal) == (1.0, 0.0)
    assert (result.harmless_unclear, result.harmless_refusal) == (0.0, 0.0)
    assert result.summary()["harmful_unclear"] == 1.0


def test_summary_keeps_its_keys_without_unclear_answers():
    plain = Evaluation(0.5, 0.0, None, 1.0, [], [], torch.zeros(0, 1))
    assert set(plain.summary()) == {"harmful_refusal", "harmless_refusal", "kl", "harmless_ce"}


def test_the_markdown_report_shows_the_unclear_rate_only_when_there_is_one():
    from refusal_kernels.pipeline.report import markdown_report

    report = {
        "model": "m",
        "mode": "weights",
        "scale": 1.0,
        "direction": {"layer": 1, "position": -1, "n_layers": 2},
        "before": {"harmful_refusal": 0.5, "harmless_refusal": 0.1},
        "after": {"harmful_refusal": 0.0, "harmless_refusal": 0.0, "kl": 0.1, "harmful_unclear": 0.25},
        "examples": [],
    }
    assert "| unclear (reasoning cut off), harmful | 0.0% | 25.0% |" in markdown_report(report)
    assert "harmless" not in markdown_report(report).split("unclear")[-1].split("\n")[0]
    del report["after"]["harmful_unclear"]
    assert "unclear" not in markdown_report(report)
