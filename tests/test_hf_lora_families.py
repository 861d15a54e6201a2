"""export_lora on every decoder family of the installed transformers: exact, or refused by name.

The cases, tiny random fp32 models and skips of test_hf_families_architectures. For each family
whose weights mode `orthogonalize_model_` accepts (one it refuses has nothing to export), with
the embeddings edited unless the head is tied to them (a tied embedding is refused by design,
which is checked too) or a norm follows them (the edit refuses them then), `export_lora` either

  * raises ValueError whose message starts with the name of a module or parameter of the
    model, writing nothing; or
  * writes an adapter that, loaded by `PeftModel.from_pretrained` onto a fresh copy of the base,
    gives the orthogonalized model's logits, active and merged, to 1e-4 of the logits' largest
    magnitude, and whose `merge_and_unload()` gives its weights.

An adapter PEFT cannot load, or one that loads into another model, fails its test. Run this
file as a script for the tally (`python tests/test_hf_lora_families.py`).
"""

from __future__ import annotations

import copy
import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from test_hf_families_architectures import CASES, _logits, build, print_tally
from tolerances import TOLERANCES

from refusal_kernels.hf import Schedule, StructureError, export_lora, orthogonalize_model_, weights
from refusal_kernels.hf import families as fam

peft = pytest.importorskip("peft")

EXACT, REFUSED, REFUSED_BY_THE_EDIT = "exact", "refused (named writer)", "refused by the edit"
LOGIT_TOLERANCE = 1e-4  # max |adapted - edited| / max |edited|: fp32 differs only in summation order


def _direction(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(model.get_input_embeddings().embedding_dim, generator=generator)


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0]


def _assert_the_tied_embedding_is_refused(model, structure, direction, out_dir: Path) -> None:
    """include_embeddings=True on a tied head is refused, naming the embedding. The schedule edits
    the embeddings alone, so that no other writer's refusal comes first."""
    n_layers = len(structure.layers)
    only_embeddings = Schedule((0.0,) * n_layers, (0.0,) * n_layers, 1.0)
    name = next(n for n, p in model.named_parameters() if p is structure.token_embedding.weight)
    message = rf"^{re.escape(name)} is tied to the output head"
    if structure.embedding_problem:  # a norm after the embeddings: orthogonalize_model_ refuses their edit already
        message = re.escape(structure.embedding_problem)
    with pytest.raises(ValueError, match=message):
        export_lora(model, direction, out_dir, scale=only_embeddings, include_embeddings=True)
    assert not out_dir.exists()


def _assert_names_a_writer(model, error: ValueError, out_dir: Path) -> None:
    name = str(error).split(maxsplit=1)[0]
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert name in names, f"the refusal does not start with a name in the model: {_first_line(error)}"
    assert not out_dir.exists(), "a refusal must write nothing"


def _relative_max_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def _assert_exact(model, path: Path, edited) -> None:
    """The adapter on a fresh copy of `model` gives `edited`'s logits, active and merged, and its weights merged."""
    expected = _logits(edited)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that bias="lora_only" changes the base's biases
        adapted = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(path)).eval()
    difference = _relative_max_difference(_logits(adapted), expected)
    assert difference <= LOGIT_TOLERANCE, f"the adapter's logits differ by {difference:.2e}: silently wrong"
    merged = adapted.merge_and_unload()
    difference = _relative_max_difference(_logits(merged), expected)
    assert difference <= LOGIT_TOLERANCE, f"the merged logits differ by {difference:.2e}: silently wrong"
    merged_weights, edited_weights = merged.state_dict(), edited.state_dict()
    assert merged_weights.keys() == edited_weights.keys()
    for name, tensor in edited_weights.items():
        torch.testing.assert_close(merged_weights[name], tensor, **TOLERANCES[torch.float32], msg=name)


def lora_outcome(registry: str, model_type: str, out_dir: Path) -> tuple[str, str]:
    """(kind, detail): EXACT, REFUSED with the message, or REFUSED_BY_THE_EDIT with the edit's message."""
    model = build(registry, model_type)
    direction = _direction(model)
    edited = copy.deepcopy(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = fam.describe_model(model)
            tied = weights.head_is_tied(model, structure)
            include_embeddings = not (tied or structure.embedding_problem)
            orthogonalize_model_(edited, direction, include_embeddings=include_embeddings)
    except StructureError as error:
        return REFUSED_BY_THE_EDIT, _first_line(error)
    if tied:
        _assert_the_tied_embedding_is_refused(model, structure, direction, out_dir / "tied")
    adapter = out_dir / "adapter"
    try:
        # orthogonalize_model_ has just made the same structure check.
        export_lora(model, direction, adapter, include_embeddings=include_embeddings, verify=False)
    except ValueError as error:
        _assert_names_a_writer(model, error, adapter)
        return REFUSED, _first_line(error)
    _assert_exact(model, adapter, edited)
    return EXACT, ""


@pytest.mark.parametrize(("registry", "model_type"), CASES)
def test_family_is_exported_exactly_or_refused(registry, model_type, tmp_path):
    kind, detail = lora_outcome(registry, model_type, tmp_path)
    print(f"{registry}:{model_type}: {kind} {detail}")


def _classified(registry: str, model_type: str) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as directory:
        try:
            return lora_outcome(registry, model_type, Path(directory))
        except (Exception, pytest.fail.Exception) as error:
            return "FAILED", f"{type(error).__name__}: {_first_line(error)[:150]}"


if __name__ == "__main__":
    print_tally(_classified)
