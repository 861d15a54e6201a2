"""README.md, the model card: which model was changed and how, its scores before and after, and how to redo it.

`model_card(report)` renders the card from the dict of report.json alone, so that the two cannot
disagree. Its YAML header is what the Hugging Face hub reads: base_model, library_name, license
(where known) and tags.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import PurePath

from ..models.default import DEFAULT_GGUF_NAME
from .report import assessment_sections, comparison_table, dtype_sentence
from .search import TrialParams, trial_schedule

TAGS = ("abliterated", "refusal-direction")
# Source models whose hub ID and license their path does not tell: file name -> (hub ID, license).
KNOWN_MODELS = {DEFAULT_GGUF_NAME: ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "apache-2.0")}
# How the hub spells a model ID. A relative path of the same shape ("models/x") passes for one.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# The hub's library_name of each output format; the first one written names the card's.
LIBRARIES = {"hf": "transformers", "gguf": "gguf", "lora": "peft"}
OUTPUT_FILES = {
    "hf": "`config.json`, `*.safetensors` and the tokenizer files: the edited model in Hugging Face format "
    "(`AutoModelForCausalLM.from_pretrained` loads it); `refusal_kernels.json`: the edit's direction, layer, "
    "position, scale and scores",
    "gguf": "`*.gguf`: the source GGUF with the direction removed, in its own quantization, for llama.cpp "
    "and the tools built on it",
    "lora": "`lora/adapter_config.json`, `lora/adapter_model.safetensors`: the edit as a rank-1 LoRA adapter on "
    "the base model, which `peft.PeftModel.from_pretrained(base, 'lora')` loads",
}
REPORT_FILES = (
    "`direction.pt`, `direction.json`: the refusal direction, and the scores of every candidate it was chosen from",
    "`heatmaps.png`: those scores over layer x position",
    "`report.json`, `report.md`: this report, as data and as text with sample answers before and after",
    "`README.md`: this card, rendered from `report.json`",
)
WARNING = (
    "> **Safety behaviour removed on purpose.** This model's refusal was taken out: it follows harmful "
    "instructions its base model declines, so whoever uses or deploys it is responsible for the safeguards "
    "that use needs."
)


def model_card(report: dict) -> str:
    """README.md from the dict of report.json (`AbliterationReport.to_dict`)."""
    name = PurePath(report["model"]).name or "model"
    lines = [
        *_front_matter(report),
        "",
        f"# {name}, abliterated",
        "",
        f"`{report['model']}` with its refusal direction removed (abliteration: Arditi et al., 2024, "
        '"Refusal in Language Models Is Mediated by a Single Direction"), by refusal-kernels.',
        "",
        WARNING,
        "",
        "## What was done",
        "",
        *_what_was_done(report),
        "",
        "## Refusal before and after",
        "",
        "Greedy answers to held-out prompts, judged by refusal phrases; KL of the next-token distribution on "
        f"harmless prompts, against the original model.{dtype_sentence(report)}",
        "",
        *comparison_table(report["before"], report["after"], report.get("kl_tokens", 1)),
        "",
        "![scores of the candidate directions over layer x position](heatmaps.png)",
        "",
        *assessment_sections(report),
        "## Reproduce",
        "",
        *_reproduction(report),
        "",
        "## Files",
        "",
        *_files(report.get("outputs"), report.get("sizes")),
    ]
    return "\n".join(lines) + "\n"


def _front_matter(report: dict) -> list[str]:
    base_model, license_id = _origin(report["model"])
    fields = {"base_model": base_model, "library_name": _library(report.get("outputs")), "license": license_id}
    # A JSON string is a YAML double-quoted scalar: paths with ':' or '#' stay one value.
    known = [f"{key}: {json.dumps(value)}" for key, value in fields.items() if value is not None]
    return ["---", *known, "tags:", *(f"- {tag}" for tag in TAGS), "---"]


def _origin(model: str) -> tuple[str | None, str | None]:
    """(base_model, license): a known model's hub ID and license, a hub ID as given, else the path's
    last component (the hub links only IDs, but the name still tells a reader what it was)."""
    name = PurePath(model).name
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    if HUB_ID.fullmatch(model) and not model.endswith(".gguf"):
        return model, None
    return name or None, None


def _library(outputs: list[str] | None) -> str | None:
    return next((LIBRARIES[kind] for kind in LIBRARIES if kind in (outputs or ())), None)


def _what_was_done(report: dict) -> list[str]:
    direction, trial = report["direction"], report.get("trial")
    counts = ", ".join(f"{kind} {count}" for kind, count in direction["prompts"].items())
    if trial is not None:
        return [
            f"- Method: trial {trial['number']} of a search, applied to the weights: each layer's attention and "
            "MLP writes to the residual stream are orthogonalized to the direction at that layer's scale in the "
            f"schedule below, the embeddings left alone{', norm-preserving' if trial['norm_preserving'] else ''}.",
            f"- Direction: {direction['variant']}, post-instruction position {direction['position']} "
            f"(-1 is the last token), of {direction['n_layers']} layers.",
            f"- Prompts (after filtering): {counts}.",
            "",
            *_schedule_table(trial, direction["n_layers"]),
        ]
    writers = (
        "the embeddings and each layer's attention and MLP outputs"
        if report.get("include_embeddings", True)
        else "each layer's attention and MLP outputs; the embeddings left alone"
    )
    method = {
        "weights": "weight orthogonalization: the direction is projected out of every weight that writes to "
        f"the residual stream ({writers})",
        "hooks": "hooks: the direction is projected out of the residual stream at run time; the weights are unchanged",
    }
    return [
        f"- Method: {method[report['mode']]}, at scale {report['scale']} (1 removes the direction's whole component).",
        f"- Direction: layer {direction['layer']} of {direction['n_layers']}, post-instruction position "
        f"{direction['position']} (-1 is the last token), variant `{direction['variant']}`, chosen by the "
        f"`{direction['rule']}` selection rule.",
        f"- Prompts (after filtering): {counts}.",
    ]


def _schedule_table(trial: dict, n_layers: int) -> list[str]:
    """The trial's per-layer scales; layers that both components leave alone are left out."""
    schedule = trial_schedule(TrialParams.from_dict(trial), n_layers)
    rows = [
        f"| {layer} | {attention:.3f} | {mlp:.3f} |"
        for layer, (attention, mlp) in enumerate(zip(schedule.attention, schedule.mlp, strict=True))
        if attention or mlp
    ]
    untouched = ["", "Other layers: unchanged."] if len(rows) < n_layers else []
    return ["| layer | attention scale | MLP scale |", "| ---: | ---: | ---: |", *rows, *untouched]


def _reproduction(report: dict) -> list[str]:
    command = report.get("command")
    if command:
        return ["```sh", shlex.join(command), "```"]
    base = ["refusal-kernels", "abliterate", "--model", report["model"]]
    trial = report.get("trial")
    if trial is not None:
        redo = [*base, "--trial", f"SEARCH_OUT:{trial['number']}", "--out", "abliterated"]
        how = "The command was not recorded. This applies the same trial again, SEARCH_OUT being the search's output:"
    else:
        redo = [*base, "--direction", "direction.pt", "--mode", report["mode"], "--scale", str(report["scale"])]
        redo += ["--out", "abliterated"]
        how = "The command was not recorded. This applies the same direction (`direction.pt`, beside this card) again:"
    return [how, "", "```sh", shlex.join(redo), "```"]


def _files(outputs: list[str] | None, sizes: dict | None) -> list[str]:
    sizes = sizes or {}
    if outputs is None:
        model_files = ["- The model files written were not recorded."]
    elif not outputs:
        model_files = ["- No model weights: only the direction and the report."]
    else:
        model_files = [f"- {OUTPUT_FILES.get(kind, f'`{kind}` output')}{_size(sizes.get(kind))}" for kind in outputs]
    source = [f"- The source model took {sizes['source'] / 1e6:.1f} MB."] if sizes.get("source") else []
    return [*model_files, *(f"- {line}" for line in REPORT_FILES), *source]


def _size(nbytes: int | None) -> str:
    return f" ({nbytes / 1e6:.1f} MB)" if nbytes else ""
