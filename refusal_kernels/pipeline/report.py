"""What a run writes: the selected direction with its evidence, and the abliteration report.

Files written by `DirectionResult.save(out_dir)`:
  direction.pt     tensors and metadata, loadable with torch.load(weights_only=True)
  direction.json   the same metadata, the per-candidate scores, timings and pass counts
  heatmaps.png     bypass, induce and KL over layer x position, as in the paper's figures
`markdown_report` renders an abliteration's report.json as report.md; `comparison_table`, its
before/after table, is shared with the model card (`card.model_card`, README.md).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SCORE_NAMES = ("bypass", "induce", "kl")


@dataclass
class DirectionResult:
    direction: torch.Tensor  # [d_model] float32: the `variant` at (layer, position), e.g. mean_harmful - mean_harmless
    layer: int
    position: int  # a negative index into the post-instruction tokens, -n_positions .. -1
    n_layers: int
    positions: list[int]
    scores: dict[str, torch.Tensor]  # name -> [n_layers, n_positions] float32, NaN where unscored
    refusal_tokens: list[int]
    prompts: dict[str, int] = field(default_factory=dict)  # prompt set -> prompts used (after filtering)
    filtered: dict[str, int] = field(default_factory=dict)  # filter -> candidates it removed
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    forward_passes: dict[str, int] = field(default_factory=dict)  # "used", "exhaustive"
    source: str = ""
    variant: str = "difference"  # how the direction was built from the means (see `variants`)
    # which selection rule chose it (one of `select.RULES`), or "given": the caller named the cell
    rule: str = "filters"

    def score(self, name: str) -> float:
        return float(self.scores[name][self.layer, self.positions.index(self.position)])

    def metadata(self) -> dict:
        meta = {k: v for k, v in asdict(self).items() if k not in ("direction", "scores")}
        meta["selected"] = {name: self.score(name) for name in SCORE_NAMES}
        meta["scores"] = {name: _nan_to_none(t.tolist()) for name, t in self.scores.items()}
        meta["direction_norm"] = float(self.direction.norm())
        return meta

    def save(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "direction.pt", lambda f: torch.save(self._payload(), f))
        atomic_write(out / "direction.json", lambda f: f.write(json.dumps(self.metadata(), indent=2).encode()))
        atomic_write(out / "heatmaps.png", lambda f: plot_heatmaps(self, f))
        return out

    def _payload(self) -> dict:
        return {
            "direction": self.direction,
            "layer": self.layer,
            "position": self.position,
            "n_layers": self.n_layers,
            "positions": self.positions,
            "scores": self.scores,
            "refusal_tokens": self.refusal_tokens,
            "source": self.source,
            "variant": self.variant,
            "rule": self.rule,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> DirectionResult:
        """Reads a direction.pt (or the directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "direction.pt"
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**payload)


def _nan_to_none(rows):
    return [[None if isinstance(v, float) and math.isnan(v) else v for v in row] for row in rows]


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot_heatmaps(result: DirectionResult, file) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    titles = {
        "bypass": "refusal score, direction ablated (harmful)",
        "induce": "refusal score, direction added (harmless)",
        "kl": "KL(base || ablated) (harmless)",
    }
    fig, axes = plt.subplots(len(SCORE_NAMES), 1, figsize=(10, 2.2 * len(SCORE_NAMES)), constrained_layout=True)
    for ax, name in zip(axes, SCORE_NAMES, strict=True):
        image = ax.imshow(result.scores[name].T.numpy(), aspect="auto", cmap="viridis", origin="lower")
        ax.set_title(titles[name], fontsize=10)
        ax.set_yticks(range(len(result.positions)), [str(p) for p in result.positions])
        ax.set_ylabel("position")
        ax.plot([result.layer], [result.positions.index(result.position)], marker="*", color="red", markersize=12)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if torch.isnan(result.scores[name]).all():
            ax.text(0.5, 0.5, "not scored (filter off)", transform=ax.transAxes, ha="center", va="center")
        fig.colorbar(image, ax=ax)
    axes[-1].set_xlabel("layer (blank: not scored, pruned or filtered)")
    model_name = Path(result.source).name if result.source else "model"
    fig.suptitle(f"{model_name}: selected layer {result.layer}, position {result.position}")
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def comparison_table(before: dict, after: dict, kl_tokens: int = 1) -> list[str]:
    """The before/after table, as Markdown lines, from report.json's "before" and "after":
    refusal rates, the unclear rates where either side recorded them, and the KL over
    kl_tokens positions of the base model's answers."""
    return [
        "| metric | before | after |",
        "| --- | ---: | ---: |",
        f"| refusal rate, harmful | {before['harmful_refusal']:.1%} | {after['harmful_refusal']:.1%} |",
        f"| over-refusal: refusal rate, harmless | {before['harmless_refusal']:.1%} | {after['harmless_refusal']:.1%} |",
        *(
            f"| unclear (reasoning cut off), {kind} | {before.get(key, 0):.1%} | {after.get(key, 0):.1%} |"
            for kind, key in (("harmful", "harmful_unclear"), ("harmless", "harmless_unclear"))
            if key in before or key in after
        ),
        f"| KL on harmless{'' if kl_tokens == 1 else f', first {kl_tokens} tokens'} | | {after['kl']:.4f} |",
    ]


def assessment_sections(report: dict) -> list[str]:
    """Markdown sections for what report.json's "capability" and "judges" hold, where they were
    measured: each lm-eval task's metrics before and after, and the substring judge against the
    model judge on the harmful answers."""
    from .capability import markdown_table
    from .model_judge import JudgeComparison

    lines = []
    if report.get("capability"):
        lines += [
            "## Capability benchmarks (lm-eval)",
            "",
            markdown_table(report["capability"]["before"], report["capability"]["after"]),
            "",
        ]
    for when, comparison in (report.get("judges") or {}).items():
        lines += [
            f"## Judges on the harmful answers, {when} the edit",
            "",
            JudgeComparison.from_dict(comparison).markdown(),
        ]
    return lines


def dtype_sentence(report: dict) -> str:
    """The sentence that says which dtype the model ran in, where report.json records it."""
    return f" The model ran in {report['dtype']}." if report.get("dtype") else ""


def markdown_report(report: dict) -> str:
    """report.md from the dict of report.json (`AbliterationReport.to_dict`)."""
    direction = report["direction"]
    lines = [
        f"# Abliteration report: {report['model']}",
        "",
        f"Mode: {report['mode']}, scale {report['scale']}. Direction: layer {direction['layer']}, "
        f"position {direction['position']} of {direction['n_layers']} layers.{dtype_sentence(report)}",
        "",
        *comparison_table(report["before"], report["after"], report.get("kl_tokens", 1)),
        "",
        *assessment_sections(report),
        "![heatmaps](heatmaps.png)",
        "",
        "## Examples",
        "",
    ]
    for example in report["examples"]:
        lines += [
            f"**{example['prompt']}**",
            "",
            f"- before: {example['before'][:200]!r}",
            f"- after: {example['after'][:200]!r}",
            "",
        ]
    return "\n".join(lines)
