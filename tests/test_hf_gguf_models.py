"""orthogonalize_gguf on a real GGUF that a package ships: SmolLM2-135M-Instruct (Q4_1, its
embeddings Q8_0, its head tied to them), read by llama.cpp and by transformers.

SmolLM2 almost never refuses, so these are mechanics: the edited file loads in both, its
untied head is the original embedding, and the edit removes the direction from what every
writer adds. The refusal figures are in test_models_default_acceptance.py. Slow: llama.cpp
comes from llama-cpp-python, which scripts/llama_cpp.sh builds; CI has it, elsewhere it skips.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import gguf
import numpy as np
import pytest
import torch
from conftest import require
from llama_cpp_runner import load_llama

from refusal_kernels import hf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def edited(smollm2_gguf, tmp_path_factory):
    direction = torch.randn(576, generator=torch.Generator().manual_seed(0))
    edit = hf.orthogonalize_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "smollm2.gguf", direction)
    return direction, edit


def test_the_tied_head_is_untied_with_the_original_embedding(smollm2_gguf, edited):
    _, edit = edited
    assert edit.untied_head
    source = {t.name: t for t in gguf.GGUFReader(smollm2_gguf).tensors}
    written = {t.name: t for t in gguf.GGUFReader(edit.path).tensors}
    assert np.array_equal(written["output.weight"].data, source["token_embd.weight"].data)
    assert written["token_embd.weight"].tensor_type == source["token_embd.weight"].tensor_type


def test_llama_cpp_loads_and_runs_the_edited_file(edited):
    require(importlib.util.find_spec("llama_cpp") is not None, "llama-cpp-python (bash scripts/llama_cpp.sh)")

    llama = load_llama(edited[1].path, n_ctx=256, seed=0, verbose=False)
    answer = llama.create_chat_completion(
        [{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0.0
    )["choices"][0]["message"]["content"]
    assert answer.strip()


def test_transformers_loads_the_edited_file_and_no_writer_adds_the_direction(edited):
    direction, edit = edited
    model, _ = hf.load_model(str(edit.path))
    unit = direction / direction.norm()
    structure = hf.describe_model(model)
    assert not model.config.tie_word_embeddings
    for writer in structure.writers(set(range(len(structure.layers))), True):
        weight = writer.parameter.detach().float()
        along = unit @ weight if writer.layout == "matrix" else weight @ unit
        # Q4_1 requantization leaves a fraction of the component: much less than a random direction's share.
        share = along.norm() / weight.norm()
        assert share < 0.5 / len(unit) ** 0.5, writer.name
