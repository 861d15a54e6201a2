"""Weight orthogonalization of a GGUF file, in its own quantization, for llama.cpp and Ollama.

`orthogonalize_gguf(src, dst, direction)` writes a copy of a GGUF file whose residual-stream
writers have no component along the direction, tensor by tensor from the memory-mapped
source (see `refusal_kernels.quant.gguf.container`):

  token_embd, position_embd          each row v <- v - s (v.d) d   (layout "rows")
  blk.N.attn_output, blk.N.ffn_down,  W <- W - s d (d^T W)           (layout "matrix"; the
  ffn_down_exps (per expert), ffn_down_shexp                        experts one at a time)
  their biases                       b <- b - s (b.d) d

Each is edited in its own GGML type: F32, F16 and BF16 by the dense ops, the block formats by
`refusal_kernels.quant.gguf.orthogonalize_`, which requantizes every block with fresh scales,
followed by feedback passes (`refusal_kernels.quant.gguf.feedback`) that take out the part of
the component that rounding to the new grid keeps.
Every other tensor, the metadata and the order are kept; keys under `refusal_kernels.` record
the edit. A file whose head is tied to token_embd (no output.weight) gets the original
token_embd as output.weight, so the unembedding is unchanged; gemma2, whose llama.cpp loader
always reads its head from token_embd, cannot be untied, so its embeddings are refused (pass
include_embeddings=False).

Gemma 2/3 add norm(y) = g * y / rms(y) to the residual, with g the stored weight of
blk.N.post_attention_norm (behind attn_output) or blk.N.post_ffw_norm (behind ffn_down):
llama.cpp multiplies by the weight as stored, which its converter writes as Gemma's 1 + w.
That is orthogonal to r iff y is orthogonal to g * r, so those writers are orthogonalized
against normalize(g * r), as `orthogonalize_model_` does on the model transformers loads.

The direction is one found on the model transformers loads from the same GGUF: its residual
stream has the same coordinates, since transformers only permutes attn_q and attn_k.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .. import ops
from .._version import __version__
from ..quant import gguf as blocks
from ..quant.gguf import container, feedback
from . import families
from .schedule import Schedule, check_scale_or_schedule

# GGUF architectures whose residual writers are exactly the tensors of WRITER_NAME, each behind
# at most the post-sublayer norm of POST_NORM_NAMES, each shown right by a test file of its own
# against orthogonalize_model_ on the model transformers loads from it. Others are refused.
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma2", "gemma3")
# The norm llama.cpp applies to a writer's output before the residual add, where a layer has it.
POST_NORM_NAMES = {families.ATTENTION: "post_attention_norm", families.MLP: "post_ffw_norm"}
# Architectures whose llama.cpp loader takes no output.weight: the head is always token_embd.
HEAD_ALWAYS_TIED = ("gemma2",)
WRITER_NAME = re.compile(
    r"(?P<embedding>token_embd|position_embd)\.weight"
    r"|blk\.(?P<layer>\d+)\.(?:(?P<attention>attn_output)|(?P<mlp>ffn_down(?:_exps|_shexp)?))\.(?P<kind>weight|bias)"
)
DENSE_TYPES = {
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
}
KEY_PREFIX = "refusal_kernels."
TIED_HEAD = "output.weight"


@dataclass(frozen=True)
class GGUFWriter:
    """One residual writer of a GGUF file: its tensor, component (families.EMBEDDING,
    ATTENTION or MLP), layer (None for embeddings) and layout ("matrix" or "rows")."""

    tensor: container.TensorInfo
    component: str
    layer: int | None
    layout: str


@dataclass(frozen=True)
class _EditOptions:
    requant: str | None  # the type writers of a type with no edit are re-encoded in
    passes: int  # feedback passes after each block-format writer's plain edit


@dataclass(frozen=True)
class GGUFEdit:
    """What `orthogonalize_gguf` wrote: the file, the tensors it changed (name -> GGML type
    written), and whether it added output.weight for a tied head."""

    path: Path
    changed: dict[str, str]
    untied_head: bool


def _writer(tensor: container.TensorInfo) -> GGUFWriter | None:
    match = WRITER_NAME.fullmatch(tensor.name)
    if match is None:
        return None
    if match["embedding"]:
        return GGUFWriter(tensor, families.EMBEDDING, None, "rows")
    component = families.ATTENTION if match["attention"] else families.MLP
    layout = "matrix" if match["kind"] == "weight" else "rows"
    return GGUFWriter(tensor, component, int(match["layer"]), layout)


def _shape(source: container.GGUFFile) -> tuple[int, int]:
    """(layers, d_model); StructureError unless the architecture's writers are known in GGUF terms."""
    arch = source.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise families.StructureError(
            f"{source.path}: architecture {arch!r}: its residual writers cannot be named in GGUF terms here "
            f"(known: {', '.join(ARCHITECTURES)}); load it with transformers and use orthogonalize_model_"
        )
    try:
        return int(source.metadata[f"{arch}.block_count"]), int(source.metadata[f"{arch}.embedding_length"])
    except KeyError as missing:
        raise container.GGUFFormatError(f"{source.path}: metadata key {missing} is missing") from None


def _check_paths(src: Path, dst: Path) -> None:
    if dst.resolve() == src.resolve() or (dst.exists() and dst.samefile(src)):
        raise ValueError(f"dst {dst} is the source file: write the edited GGUF to another path")
    if dst.is_dir():
        raise ValueError(f"dst {dst} is a directory; name the .gguf file to write")
    if not dst.parent.is_dir():
        raise ValueError(f"dst's directory {dst.parent} does not exist")


def _check_types(writers: list[GGUFWriter], requant: str | None) -> None:
    """TypeError naming the first writer whose GGML type has no edit here (unless requant is set)."""
    if requant is not None:
        if requant not in blocks.FORMATS and requant not in {t.name for t in DENSE_TYPES}:
            raise ValueError(f"requant must be one of {', '.join([*(t.name for t in DENSE_TYPES), *blocks.FORMATS])}")
        return
    for writer in writers:
        if _needs_requant(writer):
            raise TypeError(
                f"tensor {writer.tensor.name} is {writer.tensor.type.name}, a type this edit cannot requantize; "
                "pass requant (--gguf-requant TYPE) to re-encode such tensors in another type"
            )


def _target(source: container.GGUFFile, writer: GGUFWriter, directions: torch.Tensor) -> torch.Tensor:
    """The unit fp32 direction a writer is orthogonalized against: its layer's (the first
    layer's for embeddings), times the gain of the norm after its sublayer if there is one."""
    base = directions[0 if writer.layer is None else writer.layer]
    return families.writer_direction(base, _post_norm_gain(source, writer, base.numel()))


def _post_norm_gain(source: container.GGUFFile, writer: GGUFWriter, d_model: int) -> torch.Tensor | None:
    """The stored weight of the norm llama.cpp applies to the writer's output, fp32 [d_model]
    (the gain it multiplies by), or None where the layer has no such norm."""
    if writer.layer is None:
        return None
    norm = source.tensor(f"blk.{writer.layer}.{POST_NORM_NAMES[writer.component]}.weight")
    if norm is None:
        return None
    values = gguf.quants.dequantize(source.read_bytes(norm), norm.type)
    gain = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1)
    if gain.numel() != d_model:
        raise container.GGUFFormatError(f"{source.path}: {norm.name} has {gain.numel()} values, not {d_model}")
    return gain


def _edited_values(values: torch.Tensor, writer: GGUFWriter, direction: torch.Tensor, scale: float) -> None:
    """The dense edit, in place, of a writer's values [rows, ne0] (experts stacked on the rows)."""
    if writer.layout == "rows":
        ops.ablate_(values, direction, scale)
        return
    d_model = direction.numel()
    for expert in values.view(-1, d_model, values.shape[-1]):
        ops.orthogonalize_(expert, direction, scale)


def _edited_blocks_(raw: torch.Tensor, type_name: str, writer: GGUFWriter, direction, scale, passes: int) -> None:
    """The edit of a writer's blocks [rows, bytes_per_row] of a block format, in place."""
    d_model = direction.numel() if writer.layout == "matrix" else raw.shape[0]
    for part in raw.view(-1, d_model, raw.shape[-1]):
        blocks.orthogonalize_(part, type_name, direction, scale, writer.layout, passes)


def _edited_bytes(
    writer: GGUFWriter, data: np.ndarray, direction: torch.Tensor, scale: float, options: _EditOptions
) -> np.ndarray:
    """The writer's new bytes [rows, bytes_per_row], in its own type or (a type with no edit)
    re-encoded as options.requant and then edited in that type."""
    type_ = writer.tensor.type
    if type_ in DENSE_TYPES or type_.name in blocks.FORMATS:
        raw = torch.from_numpy(data)
        if type_ in DENSE_TYPES:
            _edited_values(raw.view(DENSE_TYPES[type_]), writer, direction, scale)
        else:
            _edited_blocks_(raw, type_.name, writer, direction, scale, options.passes)
        return raw.numpy()
    values = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, type_), dtype=np.float32))
    values = values.reshape(writer.tensor.rows, -1)
    if options.requant in blocks.FORMATS:
        raw = blocks.quantize(values, options.requant)
        _edited_blocks_(raw, options.requant, writer, direction, scale, options.passes)
        return raw.numpy()
    _edited_values(values, writer, direction, scale)
    return values.to(DENSE_TYPES[gguf.GGMLQuantizationType[options.requant]]).view(torch.uint8).numpy()


def _edit_record(
    scale: float | Schedule, layer: int | None, position: int | None, include_embeddings: bool, passes: int
) -> dict[str, object]:
    record: dict[str, object] = {
        "version": __version__,
        "method": "weight orthogonalization",
        "include_embeddings": include_embeddings,
        "feedback_passes": passes,
    }
    if isinstance(scale, Schedule):
        record |= {
            "schedule.attention": list(scale.attention),
            "schedule.mlp": list(scale.mlp),
            "schedule.embeddings": scale.embeddings,
        }
    else:
        record["scale"] = float(scale)
    if layer is not None:
        record["direction.layer"] = int(layer)
    if position is not None:
        record["direction.position"] = int(position)
    return {KEY_PREFIX + key: value for key, value in record.items()}


def _plan(source, schedule: Schedule, selected: list[int], include_embeddings: bool) -> list[GGUFWriter]:
    """The writers to edit: scale not 0, in the selected layers, embeddings if asked."""
    writers = [w for w in map(_writer, source.tensors) if w is not None]
    return [
        w
        for w in writers
        if schedule.scale_of(w) != 0 and (w.layer in selected if w.layer is not None else include_embeddings)
    ]


def check_gguf_file(
    src: str | os.PathLike[str], *, include_embeddings: bool = True, requant: str | None = None
) -> None:
    """What `orthogonalize_gguf` checks of the file itself, before any direction is known, so
    that a long job can refuse up front: GGUFFormatError (not a GGUF it can edit),
    StructureError (an architecture it cannot name, a tied head it cannot untie) or TypeError
    (a writer whose type has no edit, without requant)."""
    source = container.read(src)
    n_layers, _ = _shape(source)
    writers = _plan(source, Schedule.constant(n_layers, 1.0), list(range(n_layers)), include_embeddings)
    _check_types(writers, requant)
    _embedding_to_untie(source, {w.tensor.name: w for w in writers})


def orthogonalize_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    direction: torch.Tensor,
    *,
    scale: float | Schedule = 1.0,
    include_embeddings: bool = True,
    layers: Sequence[int] | None = None,
    layer: int | None = None,
    position: int | None = None,
    requant: str | None = None,
    feedback_passes: int = feedback.DEFAULT_PASSES,
) -> GGUFEdit:
    """Write `dst`, a copy of the GGUF file `src` with every residual writer orthogonalized
    against `direction`, each in its own GGML type (see the module docstring).

    Args:
        src: a GGUF file of one of ARCHITECTURES; only read.
        dst: the GGUF file to write (not src); written to a temporary file beside it and
            renamed at the end, so an error or Ctrl-C leaves no partial file.
        direction: [d_model], or one per layer [n_layers, d_model] (the embeddings use the
            first layer's), as found on the model transformers loads from src.
        scale: 1 removes the component; a Schedule gives each layer's attention and MLP
            writers, and the embeddings, their own scale (0 leaves them byte for byte).
        include_embeddings: also edit token_embd (and position_embd). A tied head (no
            output.weight) is untied: the original token_embd is written as output.weight;
            where llama.cpp cannot read that (HEAD_ALWAYS_TIED) it raises StructureError.
        layers: only the writers of these layers.
        layer, position: where the direction was found, recorded in the metadata.
        requant: the GGML type (e.g. "Q8_0") to re-encode writers whose type has no edit
            here (I-quants, TQ, MXFP4), with a warning naming them; each is then edited in
            that type, feedback passes included. Without it such a writer raises TypeError
            naming the tensor and its type.
        feedback_passes: requantization passes after the plain edit of each block-format
            writer, which take out the component along the direction that rounding to the
            new grid keeps (`quant.gguf.feedback`); 0 is the plain edit, llama.cpp's
            requantization of the fp32-orthogonalized weight.

    Returns:
        A GGUFEdit: the path written, the tensors changed and whether the head was untied.

    Bad arguments and bad files raise ValueError (GGUFFormatError for a file that is not a
    GGUF this reader can edit, StructureError for an architecture it cannot name or a head it
    cannot untie) or TypeError before anything is written.
    """
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    source = container.read(src)
    n_layers, d_model = _shape(source)
    selected = families.check_directions(direction, n_layers, d_model, layers, " (the file's embedding length)")
    directions = direction.detach().float().cpu().reshape(-1, d_model).expand(n_layers, d_model)
    scale = check_scale_or_schedule(scale, n_layers)
    schedule = scale if isinstance(scale, Schedule) else Schedule.constant(n_layers, scale)
    writers = _plan(source, schedule, selected, include_embeddings)
    _check_types(writers, requant)
    if isinstance(feedback_passes, bool) or not isinstance(feedback_passes, int) or feedback_passes < 0:
        raise ValueError(f"feedback_passes must be a non-negative int, got {feedback_passes!r}")
    options = _EditOptions(requant, feedback_passes)
    requantized = [w.tensor.name for w in writers if _needs_requant(w)]
    if requantized:
        warnings.warn(f"re-encoding {', '.join(requantized)} as {requant}: their types have no edit", stacklevel=2)
    by_name = {w.tensor.name: w for w in writers}
    embedding = _embedding_to_untie(source, by_name)
    outputs = [_output(source, t, by_name.get(t.name), directions, schedule, options) for t in source.tensors]
    if embedding is not None:
        outputs.append(container.OutputTensor(TIED_HEAD, embedding.type, embedding.shape, source=embedding))
    record = _edit_record(scale, layer, position, include_embeddings, feedback_passes)
    container.write(source, dst, outputs, record)
    return GGUFEdit(dst, {o.name: o.type.name for o in outputs if o.make is not None}, embedding is not None)


def _embedding_to_untie(source: container.GGUFFile, by_name: dict[str, GGUFWriter]) -> container.TensorInfo | None:
    """token_embd where it is edited and the head is tied to it (no output.weight), else None;
    StructureError where the architecture's llama.cpp loader reads no untied head."""
    embedding = source.tensor("token_embd.weight")
    if source.tensor(TIED_HEAD) is not None or embedding is None or embedding.name not in by_name:
        return None
    arch = source.metadata["general.architecture"]
    if arch in HEAD_ALWAYS_TIED:
        raise families.StructureError(
            f"{source.path}: llama.cpp's {arch} always reads its output head from token_embd (no output.weight), "
            "so token_embd cannot be edited without changing the unembedding; pass include_embeddings=False "
            "(--no-embeddings)"
        )
    return embedding


def _needs_requant(writer: GGUFWriter) -> bool:
    return writer.tensor.type not in DENSE_TYPES and writer.tensor.type.name not in blocks.FORMATS


def _output(source, tensor, writer, directions, schedule, options) -> container.OutputTensor:
    """A source tensor as written: its bytes copied, or (a writer) edited when written."""
    if writer is None:
        return container.OutputTensor(tensor.name, tensor.type, tensor.shape, source=tensor)
    type_ = gguf.GGMLQuantizationType[options.requant] if _needs_requant(writer) else tensor.type
    direction = _target(source, writer, directions)

    def make() -> np.ndarray:
        return _edited_bytes(writer, source.read_bytes(tensor), direction, schedule.scale_of(writer), options)

    return container.OutputTensor(tensor.name, type_, tensor.shape, make=make)
