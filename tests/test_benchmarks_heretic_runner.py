"""The search benchmark's heretic runner, against a stand-in `heretic` that prints what heretic 1.4.0 prints."""

import importlib.util
import stat
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_search_vs_heretic.py"
SETS = {"harmful": ["h1", "h2"], "harmless": ["ok1"], "harmful_val": ["v1", "v2", "v3"], "harmless_val": ["w1"]}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search_vs_heretic", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_heretic(tmp_path, trials_printed: int, then: str) -> str:
    """An executable printing heretic's setup and per-trial lines, then running `then` (its menu)."""
    lines = ["Determining optimal batch size...", "* Initial refusals: 3/3"]
    for i, (kl, refusals) in enumerate([(0.25, 0), (0.05, 2), (0.1, 1)][:trials_printed], 1):
        lines += [f"Running trial {i} of 3...", "* Evaluating...", f"  * KL divergence: {kl:.4f}"]
        lines += [f"  * Refusals: {refusals}/3", "Elapsed time: 1s"]
    if trials_printed == 3:
        lines += ["Optimization finished!", "[Trial   1] Refusals:  0/3, KL divergence: 0.2500"]
    script = tmp_path / "heretic"
    body = "\n".join(f"print({line!r}, flush=True)" for line in lines)
    script.write_text(f"#!{sys.executable}\nimport time\n{body}\n{then}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_trials_are_read_and_the_menu_is_not_waited_for(bench, tmp_path):
    # The stand-in then blocks as heretic's interactive menu would; the runner must not wait for it.
    command = fake_heretic(tmp_path, 3, "time.sleep(600)")
    out = tmp_path / "run"
    result = bench.run_heretic(command, tmp_path / "model", SETS, 3, out)
    assert result["trials"] == [{"kl": 0.25, "refusals": 0}, {"kl": 0.05, "refusals": 2}, {"kl": 0.1, "refusals": 1}]
    assert (result["refusals"], result["kl"], result["base_refusals"], result["n_prompts"]) == (0, 0.25, 3, 3)
    assert 0 <= result["setup_seconds"] <= result["total_seconds"]
    assert (out / "harmful_val.txt").read_text() == "v1\nv2\nv3\n"
    config = (out / "config.toml").read_text()
    assert "n_trials = 3" in config and f'model = "{tmp_path / "model"}"' in config
    assert "Optimization finished!" in (out / "heretic.log").read_text()


def test_a_run_that_stops_early_is_an_error(bench, tmp_path):
    command = fake_heretic(tmp_path, 1, "")
    with pytest.raises(RuntimeError, match="before finishing its 3 trials"):
        bench.run_heretic(command, tmp_path / "model", SETS, 3, tmp_path / "run")
    assert "Running trial 1 of 3" in (tmp_path / "run" / "heretic.log").read_text()
