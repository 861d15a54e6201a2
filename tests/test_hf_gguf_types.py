"""orthogonalize_gguf's output in every GGML type it edits, run by llama.cpp itself and by transformers.

Each type gets a small synthetic llama file (tests/gguf_files.py: 2 layers, d_model 256, a head
tied to token_embd) whose residual writers (token_embd, attn_output, ffn_down) are stored in
that type by the package's own encoders. Its tokenizer model is "none", which llama.cpp loads
as a model with no vocabulary: both runtimes take the same token ids. The edited file must run
in llama.cpp as in transformers, and the residual stream llama.cpp computes from it must keep
little of the direction, as much as the type's requantization leaves.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import require
from gguf_files import D_MODEL, write
from llama_cpp_runner import load_llama
from test_hf_gguf import TYPES, _direction, _values

from refusal_kernels.hf import orthogonalize_gguf, orthogonalize_model_

TOKENS = list(range(1, 17))
# llama.cpp's logits against transformers' on the same edited file, as a fraction of the fp32
# edit's change to the logits: llama.cpp rounds the activations a weight multiplies to the
# weight's dtype (F16, BF16) or, for the block formats, to 8 bits (Q8_0 or Q8_K blocks). Over
# four directions that was at most 0.021 (BF16) and 0.18 (Q2_K).
LOGITS_BOUND = {"F32": 1e-3, "F16": 0.01, "BF16": 0.05}
BLOCK_LOGITS_BOUND = 0.3
# The direction's share of llama.cpp's final residual stream, edited over unedited: what
# requantizing the writers (with the default feedback passes) keeps, plus llama.cpp's own
# rounding. Over four directions at most: 0.0004 (F16), 0.003 (BF16), 0.008 (Q8_0), 0.027
# (Q6_K), 0.17 (Q5_*), 0.37 (Q4_*) and 0.43 (Q2_K); without feedback passes Q2_K keeps 0.92.
LEFT_BOUND = {
    "F32": 1e-4,
    "F16": 2e-3,
    "BF16": 0.01,
    "Q8_0": 0.02,
    "Q6_K": 0.06,
    "Q5_0": 0.3,
    "Q5_1": 0.3,
    "Q5_K": 0.3,
    "Q4_0": 0.6,
    "Q4_1": 0.6,
    "Q4_K": 0.6,
    "Q3_K": 0.6,
    "Q2_K": 0.6,
}


@dataclass(frozen=True)
class _Runs:
    """Logits [tokens, vocab] of the edited file in llama.cpp and in transformers, of the source in
    transformers, and of transformers' fp32 edit of the source's weights; and the direction's
    component in llama.cpp's final residual stream (over its RMS) [tokens], edited and unedited."""

    type_name: str
    llama_cpp: np.ndarray
    transformers: np.ndarray
    source: np.ndarray
    fp32_edit: np.ndarray
    along: np.ndarray
    along_source: np.ndarray

    def _over_the_edit(self, logits: np.ndarray, reference: np.ndarray) -> float:
        """max |logits - reference|, over the largest change the fp32 edit makes to the logits."""
        return float(np.abs(logits - reference).max() / np.abs(self.fp32_edit - self.source).max())

    @property
    def runtimes_apart(self) -> float:
        return self._over_the_edit(self.llama_cpp, self.transformers)

    @property
    def from_fp32_edit(self) -> float:
        """How far requantization (and llama.cpp) put the logits from the fp32 edit's."""
        return self._over_the_edit(self.llama_cpp, self.fp32_edit)

    @property
    def share_left(self) -> float:
        return float(np.linalg.norm(self.along) / np.linalg.norm(self.along_source))


def _llama_cpp(path, unit: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's logits for TOKENS, and its final residual stream's component along unit over its RMS."""
    import llama_cpp

    f32 = llama_cpp.GGML_TYPE_F32
    model = load_llama(
        path,
        n_ctx=32,
        logits_all=True,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
        type_k=f32,
        type_v=f32,
        verbose=False,
    )
    model.eval(TOKENS)
    # Unpooled, llama.cpp's embeddings are its output norm's: gain * h / rms(h).
    normed = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(model.ctx), shape=(len(TOKENS), D_MODEL))
    gain = _values(next(t for t in gguf.GGUFReader(path).tensors if t.name == "output_norm.weight")).numpy()
    return np.array(model.scores[: len(TOKENS)]), (normed / gain) @ unit.numpy()


def _logits(directory, file_name: str, direction: torch.Tensor | None = None) -> np.ndarray:
    """transformers' logits for TOKENS of the model it loads from a GGUF, orthogonalized if a direction is given."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name)
    if direction is not None:
        orthogonalize_model_(model, direction)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


@pytest.fixture(scope="module", params=TYPES)
def runs(request, tmp_path_factory) -> _Runs:
    """One type's source file and orthogonalize_gguf's edit of it, run by llama.cpp and transformers."""
    require(importlib.util.find_spec("llama_cpp") is not None, "llama-cpp-python (bash scripts/llama_cpp.sh)")
    type_name = request.param
    directory = tmp_path_factory.mktemp(type_name)
    src = write(directory / "src.gguf", writer_type=type_name)
    direction = _direction()
    out = orthogonalize_gguf(src, directory / "out.gguf", direction).path
    unit = direction / direction.norm()
    llama_cpp_logits, along = _llama_cpp(out, unit)
    made = _Runs(
        type_name,
        llama_cpp_logits,
        _logits(directory, out.name),
        _logits(directory, src.name),
        _logits(directory, src.name, direction),
        along,
        _llama_cpp(src, unit)[1],
    )
    print(
        f"\n{type_name}: llama.cpp vs transformers {made.runtimes_apart:.2g}, from the fp32 edit "
        f"{made.from_fp32_edit:.2g} (of the edit's change); the direction's share left {made.share_left:.2g}"
    )
    return made


def test_llama_cpp_runs_the_edited_file_as_transformers_does(runs):
    assert runs.runtimes_apart < LOGITS_BOUND.get(runs.type_name, BLOCK_LOGITS_BOUND)


def test_llama_cpps_residual_stream_keeps_little_of_the_direction(runs):
    assert runs.share_left < LEFT_BOUND[runs.type_name]
