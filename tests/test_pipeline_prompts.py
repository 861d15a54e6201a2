"""Tests for refusal_kernels.pipeline.prompts: loaders, field detection, errors, splits and builtin sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refusal_kernels.pipeline.prompts import PromptSets, builtin_prompts, load_prompts, train_val_split

PROMPTS = ["Explain how tides work", "Write a haiku about rain", "How do I boil an egg"]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("field", ["instruction", "prompt", "goal", "Behavior", "forbidden_prompt", "QUESTION"])
def test_json_objects_detect_common_fields(tmp_path: Path, field: str) -> None:
    rows = [{field: prompt, "category": "x"} for prompt in PROMPTS]
    assert load_prompts(write(tmp_path / "p.json", json.dumps(rows))) == PROMPTS


def test_json_list_of_strings_is_stripped_and_skips_blanks(tmp_path: Path) -> None:
    source = write(tmp_path / "p.json", json.dumps([f"  {PROMPTS[0]} ", "", *PROMPTS[1:]]))
    assert load_prompts(source) == PROMPTS


def test_jsonl(tmp_path: Path) -> None:
    lines = "\n".join(json.dumps({"goal": prompt, "target": "Sure"}) for prompt in PROMPTS)
    assert load_prompts(write(tmp_path / "p.jsonl", lines + "\n\n")) == PROMPTS


def test_csv_with_quoted_commas(tmp_path: Path) -> None:
    prompts = [*PROMPTS, "Name three fruits, then sort them"]
    text = "id,Behavior,category\n" + "".join(f'{i},"{prompt}",c\n' for i, prompt in enumerate(prompts))
    assert load_prompts(write(tmp_path / "p.csv", text)) == prompts


def test_txt_one_prompt_per_line(tmp_path: Path) -> None:
    assert load_prompts(write(tmp_path / "p.txt", "\n".join(PROMPTS) + "\n\n")) == PROMPTS


def test_detection_prefers_instruction_over_text(tmp_path: Path) -> None:
    rows = [{"text": "other", "instruction": prompt} for prompt in PROMPTS]
    assert load_prompts(write(tmp_path / "p.json", json.dumps(rows))) == PROMPTS


def test_field_override(tmp_path: Path) -> None:
    rows = [{"instruction": "ignored", "my_column": prompt} for prompt in PROMPTS]
    source = write(tmp_path / "p.json", json.dumps(rows))
    assert load_prompts(source, field="my_column") == PROMPTS
    assert load_prompts(source, field="MY_COLUMN") == PROMPTS


def test_unknown_field_override_lists_columns(tmp_path: Path) -> None:
    source = write(tmp_path / "p.json", json.dumps([{"instruction": PROMPTS[0]}]))
    with pytest.raises(ValueError, match=r"field: 'nope'.*columns found: \['instruction'\]"):
        load_prompts(source, field="nope")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"source: file .*missing\.json does not exist"):
        load_prompts(tmp_path / "missing.json")


@pytest.mark.parametrize(("name", "text"), [("e.json", ""), ("e.txt", "\n  \n"), ("e.csv", "  ")])
def test_empty_file(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(ValueError, match=r"source: file .* is empty"):
        load_prompts(write(tmp_path / name, text))


@pytest.mark.parametrize(("name", "text"), [("n.json", "[]"), ("n.json", '["", "  "]'), ("n.csv", "prompt\n")])
def test_no_prompts(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(ValueError, match=r"source: .* contains no prompts"):
        load_prompts(write(tmp_path / name, text))


def test_no_instruction_field_lists_columns(tmp_path: Path) -> None:
    source = write(tmp_path / "p.jsonl", json.dumps({"id": 1, "label": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"no instruction field.*columns found: \['id', 'label'\]"):
        load_prompts(source)


def test_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown extension '\.parquet'"):
        load_prompts(write(tmp_path / "p.parquet", "x"))


def test_hub_id_without_datasets_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import datasets` fail even where the package is installed.
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(ValueError, match=r"source: 'someone/some-prompts' .*needs the `datasets` package"):
        load_prompts("someone/some-prompts")


@pytest.mark.parametrize("kwargs", [{"val_fraction": 0.25}, {"n_train": 30, "n_val": 10}, {"n_val": 10}])
def test_split_is_deterministic_disjoint_and_sized(kwargs: dict[str, float]) -> None:
    prompts = [f"prompt {i}" for i in range(40)]
    train, val = train_val_split(prompts, seed=3, **kwargs)
    assert (len(train), len(val)) == (30, 10)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(prompts)
    assert train_val_split(prompts, seed=3, **kwargs) == (train, val)
    assert train_val_split(prompts, seed=4, **kwargs) != (train, val)


def test_split_subsamples_without_overlap() -> None:
    prompts = [f"prompt {i}" for i in range(100)]
    train, val = train_val_split(prompts, n_train=20, n_val=5, seed=0)
    assert (len(train), len(val)) == (20, 5)
    assert not set(train) & set(val)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"val_fraction": 0.5, "n_val": 2}, {"val_fraction": 1.5}, {"n_train": 8, "n_val": 5}, {"n_val": -1}],
)
def test_split_rejects_bad_sizes(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        train_val_split([f"p{i}" for i in range(10)], **kwargs)


@pytest.mark.parametrize("kind", ["harmful", "harmless"])
def test_builtin_sets(kind: str) -> None:
    prompts = builtin_prompts(kind)
    assert len(prompts) >= 128
    assert len({prompt.lower() for prompt in prompts}) == len(prompts)
    assert all(prompt == prompt.strip() and prompt for prompt in prompts)


def test_builtin_sets_do_not_overlap() -> None:
    assert not set(builtin_prompts("harmful")) & set(builtin_prompts("harmless"))


def test_builtin_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        builtin_prompts("neutral")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"standard prompt splits not found at {SHARED_DATA}")
def test_loads_standard_splits() -> None:
    harmful = load_prompts(SHARED_DATA / "harmful_train.json")
    assert len(harmful) >= 128
    train, val = train_val_split(harmful, n_train=128, n_val=32, seed=42)
    assert (len(train), len(val)) == (128, 32)


def test_split_is_seeded_and_disjoint():
    prompts = [f"p{i}" for i in range(50)]

    def split(items, n_train, n_val, seed):
        sets = PromptSets.split(items, items, n_train=n_train, n_val=n_val, seed=seed)
        return sets.harmful, sets.harmful_val

    train, val = split(prompts, 30, 10, seed=3)
    assert (train, val) == split(prompts, 30, 10, seed=3)
    assert len(train) == 30 and len(val) == 10 and not set(train) & set(val)
    assert split(prompts, 30, 10, seed=4) != (train, val)
    assert [len(part) for part in split(prompts[:6], 30, 10, seed=3)] == [3, 3]  # half at most to validation


def test_prompt_sets_name_an_empty_or_mistyped_set():
    with pytest.raises(ValueError, match="harmless_val is empty"):
        PromptSets(["a"], ["b"], ["c"], [])
    with pytest.raises(TypeError, match="harmful must be a list of strings"):
        PromptSets("a", ["b"], ["c"], ["d"])
    with pytest.raises(TypeError, match="harmless must hold only strings"):
        PromptSets(["a"], ["b", 3], ["c"], ["d"])


def test_builtin_prompt_sets_are_disjoint_and_cut_to_size():
    sets = PromptSets.builtin(n_train=20, n_val=8, seed=0)
    assert (len(sets.harmful), len(sets.harmful_val), len(sets.harmless), len(sets.harmless_val)) == (20, 8, 20, 8)
    assert not set(sets.harmful) & set(sets.harmful_val)
