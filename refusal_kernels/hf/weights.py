"""Weight orthogonalization of a loaded transformers model: the refusal direction, baked in.

Every parameter that writes into the residual stream (see `families`) is changed in place so
that what it writes has no component along r:

  * nn.Linear weights [d_model, d_in] and fused experts [E, d_model, d_ff]: W <- W - s r (r^T W);
  * embedding rows, biases, GPT-2 Conv1D weights [d_in, d_model] and transposed experts: each
    row v <- v - s (v.r) r.

Quantized projections and quantized fused experts (see `families`) are edited in their own
storage by the format's op in `refusal_kernels.quant` (one expert at a time), which requantizes
each group with a fresh scale: the written component along r is then zero only up to one
quantization step, not exactly.

With scale=1, dense weights and no post-sublayer norms this equals `patch(mode="hooks")`:
every residual state is orthogonal to r. Tied embeddings are untied first (the head keeps the
original matrix), so the logits are those of the hooks model too.

Gemma 2/3 add norm(y) = g * y / rms(y) to the residual, not y. That is orthogonal to r iff y
is orthogonal to g * r, so their attention and MLP writers are orthogonalized against
normalize(g * r), with g the norm's effective gain (1 + weight in Gemma). The residual is then
orthogonal to r, as in hooks mode, but the states differ: the hooks ablate r after the norm,
which keeps the RMS of y, while the weights remove g * r before it, which changes rms(y) and
so rescales the token's whole written vector (the README gives the measured difference).

`scale` is one number for every writer or a `Schedule` (see `schedule`): a scale per layer for
the attention writers and for the MLP writers, and one for the embeddings. Writers whose scale
is 0 are left as they are and not recorded.

With undo=True the record keeps, for each dense tensor, what `undo_` needs to add the removed
component back: the fp32 unit direction d it was orthogonalized against, its scale s and the
fp32 projection of the original weight, c = d^T W [..., d_in] for a matrix or v.d for each row
of a row layout. That is O(d_in) memory per matrix (O(rows) for embeddings, biases, Conv1D
weights), never a copy of the model, and it is computed chunk by chunk, so no fp32 copy of a
whole tensor is made either. The restored weights are within about one rounding step of the
original ones (the bound is in `undo_`'s docstring). Requantization is not reversible, so
undo=True refuses quantized writers. undo="exact" (what `patch(mode="weights")` uses) adds the
original value of each element that the restore would not give back bit for bit, found at edit
time by running the restore's own elementwise arithmetic, which gives the same bits on every
run; it keeps a copy of quantized storage. undo_ then restores every tensor bit for bit, for
the memory of the record plus a few percent of the dense writers' elements (README).

With norm_preserving=True every residual vector v of a writer (a matrix's column, or a row of
a row layout) keeps its norm: v <- ||v|| normalize(v - s (d.v) d), `orthogonalize_norm_preserving_`
with axis="column" for matrices. It is reversible with the same O(d_in) record plus the fp32
norms ||v||: since ||v - s c d||^2 = ||v||^2 - (2s - s^2) c^2, undo_ recovers
v = v' sqrt(||v||^2 - (2s - s^2) c^2) / ||v|| + s c d. Quantized writers have no norm-preserving
edit, so norm_preserving=True refuses them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .. import ops, reference
from . import families
from . import verify as self_check
from .schedule import Schedule, check_scale_or_schedule

# undo_'s fp32 temporaries hold at most about this many elements of a tensor at a time.
UNDO_CHUNK_ELEMENTS = 1 << 22
# orthogonalize_model_(undo=EXACT): the record of undo=True plus the original value of every
# element it would not restore bit for bit, and a copy of quantized storage; undo_ is then exact.
EXACT = "exact"
UNDO_MODES = (False, True, EXACT)


@dataclass(frozen=True)
class ChangedTensor:
    """One tensor `orthogonalize_model_` changed: name, shape, layout (MATRIX/ROWS), layer, and
    the scale it was orthogonalized with (its Schedule entry, or the one number).

    For a quantized weight, shape is that of the dequantized [out, in] matrix ([E, out, in]
    for fused experts) and `format`
    names the storage ("gptq", "bitsandbytes-nf4", ...; see `refusal_kernels.quant`); None
    for a dense tensor.
    """

    name: str
    shape: tuple[int, ...]
    layout: str
    layer: int | None
    scale: float
    format: str | None = None


@dataclass(frozen=True)
class UndoEntry:
    """What `undo_` needs to restore one dense tensor: W <- W + scale * d c^T.

    name, tensor: the tensor (a parameter of the model) and its name.
    layout: MATRIX or ROWS.
    direction: the fp32 unit direction d it was orthogonalized against (normalize(g * r)
        behind a post-sublayer norm).
    scale: the scale it was orthogonalized with.
    projection: fp32 c, taken from the original tensor: d^T W [..., d_in] (MATRIX) or each
        row's v.d [...] (ROWS).
    version: tensor._version just after the edit; an in-place change since alters it.
    norms: for a norm-preserving edit, the fp32 norm ||v|| of each original residual vector
        (same shape as projection); None for a plain edit.
    fixes: with undo="exact", (indices, values): the row-major flat index and original value
        of every element the restore alone would not give back bit for bit, or (None, a copy
        of the original) where those would take more memory than a copy; else None.
    """

    name: str
    tensor: torch.Tensor
    layout: str
    direction: torch.Tensor
    scale: float
    projection: torch.Tensor
    version: int
    norms: torch.Tensor | None = None
    fixes: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class UndoData:
    """The model, its structure (to tie the head again), an UndoEntry for each dense tensor
    changed, and (undo="exact") a copy of each quantized storage tensor changed."""

    model: nn.Module
    structure: families.ModelStructure
    entries: list[UndoEntry]
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (tensor, original)
    spent: bool = False


@dataclass
class OrthogonalizationRecord:
    """What `orthogonalize_model_` did.

    changed: every tensor it modified, in order.
    untied_head: the name of the output head's weight if it was untied from the token
        embedding (it now holds its own copy of the original matrix), else None.
    scale: the scale used, a number or a Schedule.
    norm_preserving: whether every residual vector kept its norm (see the module docstring).
    undo: what `undo_` restores the weights from (orthogonalize_model_(..., undo=True or "exact")), else None.
    """

    changed: list[ChangedTensor] = field(default_factory=list)
    untied_head: str | None = None
    scale: float | Schedule = 1.0
    norm_preserving: bool = False
    undo: UndoData | None = field(default=None, repr=False)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


def head_is_tied(model: nn.Module, structure: families.ModelStructure) -> bool:
    head = _output_head(model)
    return head is not None and head.weight is structure.token_embedding.weight


def _refresh_tied_keys(model: nn.Module) -> None:
    # transformers caches the tied-parameter mapping; save_pretrained drops the keys it lists.
    if hasattr(model, "all_tied_weights_keys") and hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def untie_head(model: nn.Module, structure: families.ModelStructure) -> str:
    """Give the output head its own copy of the token embedding; returns the head's parameter name."""
    head = _output_head(model)
    head.weight = nn.Parameter(structure.token_embedding.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    _refresh_tied_keys(model)
    return next(name for name, p in model.named_parameters() if p is head.weight)


def retie_head(model: nn.Module, structure: families.ModelStructure) -> None:
    """Undo `untie_head`: the head shares the token embedding's parameter again."""
    _output_head(model).weight = structure.token_embedding.weight
    model.config.tie_word_embeddings = True
    _refresh_tied_keys(model)


@dataclass(frozen=True)
class _Edit:
    """One writer to orthogonalize, with its fp32 unit direction (on its device) and its scale."""

    writer: families.ResidualWriter
    direction: torch.Tensor
    scale: float


def _plan(
    model: nn.Module,
    direction: torch.Tensor,
    scale: float | Schedule,
    include_embeddings: bool,
    layers: Sequence[int] | None,
    structure_spec: families.StructureSpec | None = None,
) -> tuple[families.ModelStructure, float | Schedule, list[_Edit], dict[int, torch.Tensor]]:
    """The structure, the checked scale, every edit and the selected layers' directions; bad
    arguments raise before anything is written."""
    structure = families.describe_model(model, structure_spec)
    directions = families.layer_directions(direction, structure, layers)
    scale = check_scale_or_schedule(scale, len(structure.layers))
    schedule = scale if isinstance(scale, Schedule) else Schedule.constant(len(structure.layers), scale)
    first = directions[min(directions)] if directions else None
    gains: dict[int, torch.Tensor] = {}
    edits = []
    for writer in structure.writers(set(directions), include_embeddings and first is not None):
        writer_scale = schedule.scale_of(writer)
        if writer_scale == 0:
            continue
        base = first if writer.layer is None else directions[writer.layer]
        gain = None
        if writer.post_norm is not None:
            gain = gains.setdefault(id(writer.post_norm), families.norm_gain(writer.post_norm))
        target = families.writer_direction(base, gain).to(writer.parameter.device)
        edits.append(_Edit(writer, target, writer_scale))
    _check_in_memory(edits)
    _check_quantized(edits)
    if structure.embedding_problem and _edits_embeddings(edits):
        raise families.StructureError(
            f"{structure.embedding_problem}; pass include_embeddings=False (then r stays in the embeddings' write) "
            "or use patch(mode='hooks')"
        )
    return structure, scale, edits, directions


def _edits_embeddings(edits: list[_Edit]) -> bool:
    return any(e.writer.component == families.EMBEDDING for e in edits)


def _check_in_memory(edits: list[_Edit]) -> None:
    """Offloaded weights (on the meta device until a forward pass loads them) cannot be edited in place."""
    offloaded = [edit.writer.name for edit in edits if edit.writer.parameter.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"{offloaded[0]} and {len(offloaded) - 1} other residual writers are offloaded (on the meta device), "
            "so they cannot be orthogonalized in place; use hooks mode, or orthogonalize_checkpoint on the "
            "checkpoint's files"
        )


def _check_quantized(edits: list[_Edit]) -> None:
    """Every quantized writer's layout, checked before anything is written; errors name the tensor."""
    for edit in edits:
        quantized = edit.writer.quantized
        if quantized is None:
            continue
        try:
            quantized.check(edit.direction, edit.scale)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{edit.writer.name} ({quantized.format}): {error}") from error


def _check_dense(edits: list[_Edit], why: str) -> None:
    """Raise ValueError naming the first quantized writer's module, followed by `why`."""
    for edit in edits:
        quantized = edit.writer.quantized
        if quantized is not None:
            module = edit.writer.name.removesuffix(f".{quantized.tensor_name}")
            raise ValueError(f"{module} ({quantized.format}): {why}")


def _vectors(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """A view [..., n, d_model] of the n residual vectors of a tensor: a matrix's columns, or its rows."""
    if layout == families.MATRIX:
        return tensor.transpose(-1, -2)
    return tensor if tensor.dim() > 1 else tensor.unsqueeze(0)


def _chunks(vectors: torch.Tensor) -> Iterator[slice]:
    """Slices of the vectors' axis whose chunks hold about UNDO_CHUNK_ELEMENTS elements each."""
    count = vectors.shape[-2]
    step = max(1, UNDO_CHUNK_ELEMENTS * count // max(1, vectors.numel()))
    return (slice(start, start + step) for start in range(0, count, step))


def _projection(
    tensor: torch.Tensor, layout: str, direction: torch.Tensor, with_norms: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """c = d.v in fp32 for each residual vector v of the tensor ([..., n]), one chunk at a time,
    and with_norms, ||v|| in fp32 too (else None)."""
    vectors = _vectors(tensor.detach(), layout)
    projections, norms = [], []
    for chunk in _chunks(vectors):
        part = vectors[..., chunk, :].float()
        projections.append(part @ direction)
        if with_norms:
            norms.append(part.norm(dim=-1))
    return torch.cat(projections, dim=-1), torch.cat(norms, dim=-1) if with_norms else None


def _kept_fraction(norms: torch.Tensor, projection: torch.Tensor, scale: float) -> torch.Tensor:
    """||v - s c d|| / ||v|| from ||v|| and c, 0 for a zero vector: what a norm-preserving edit rescaled by."""
    squared = (norms.square() - (2 * scale - scale * scale) * projection.square()).clamp_min(0)
    return torch.where(norms > 0, squared.sqrt() / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def _restored(entry: UndoEntry, chunk: slice) -> torch.Tensor:
    """One chunk's restored vectors in the tensor's dtype: v' + scale * c d (after undoing the
    rescaling of a norm-preserving edit), in fp32, rounded once.

    Each step is its own elementwise op (no fused multiply-add), so the result is the same
    bits however the op is split across threads: undo="exact" relies on that to know, at edit
    time, which elements the restore will miss.
    """
    part = _vectors(entry.tensor.detach(), entry.layout)[..., chunk, :]
    edited = part.float()
    if entry.norms is not None:
        edited *= _kept_fraction(entry.norms[..., chunk], entry.projection[..., chunk], entry.scale)[..., None]
    removed = (entry.projection[..., chunk, None] * entry.scale) * entry.direction
    return (edited + removed).to(part.dtype)


def _restore_(entry: UndoEntry) -> None:
    """Put every chunk's restored vectors back, then the recorded original of each element missed."""
    indices, values = entry.fixes or (None, None)
    if values is not None and indices is None:
        entry.tensor.detach().copy_(values)
        return
    vectors = _vectors(entry.tensor.detach(), entry.layout)
    for chunk in _chunks(vectors):
        vectors[..., chunk, :].copy_(_restored(entry, chunk))
    if indices is not None:
        entry.tensor.detach().index_put_(torch.unravel_index(indices.long(), entry.tensor.shape), values)


def _fixes(entry: UndoEntry, original: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(flat indices, original values) of the elements `_restored` does not give back bit for
    bit, compared as bits (so -0.0 and NaN payloads count), one chunk at a time; or (None,
    original) when they would take more memory than the original. In bfloat16 and float16
    they are a few percent of the elements; in float32 the edit's kernel and the record
    accumulate c in different orders, which moves many small elements by a step or more."""
    missed = torch.zeros(original.shape, dtype=torch.bool, device=original.device)
    bits = _bits_dtype(original.dtype)
    missed_vectors, original_vectors = _vectors(missed, entry.layout), _vectors(original, entry.layout)
    for chunk in _chunks(original_vectors):
        restored = _restored(entry, chunk).view(bits)
        missed_vectors[..., chunk, :] = restored != original_vectors[..., chunk, :].view(bits)
    indices = missed.view(-1).nonzero().squeeze(1)
    if original.numel() <= torch.iinfo(torch.int32).max:
        indices = indices.to(torch.int32)
    if indices.numel() * (indices.itemsize + original.itemsize) >= original.numel() * original.itemsize:
        return None, original
    return indices, original.reshape(-1)[indices.long()]


def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of the same width, to compare floats bit for bit."""
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def _ablate_rows_norm_preserving_(tensor: torch.Tensor, direction: torch.Tensor, scale: float) -> None:
    """`reference.ablate_norm_preserving` on each row, in place, one chunk of rows at a time."""
    vectors = _vectors(tensor, families.ROWS)
    for chunk in _chunks(vectors):
        part = vectors[..., chunk, :]
        part.copy_(reference.ablate_norm_preserving(part, direction, scale))


def _orthogonalize_dense_(edit: _Edit, undo: bool | str, norm_preserving: bool) -> UndoEntry | None:
    """Orthogonalize one dense tensor, plainly or keeping each residual vector's norm; with undo,
    return what restores it (exactly with undo="exact", which holds a copy of this one tensor
    while it finds the elements the restore would miss)."""
    writer = edit.writer
    tensor, layout = writer.parameter.data, writer.layout
    projection, norms = _projection(tensor, layout, edit.direction, norm_preserving) if undo else (None, None)
    original = tensor.clone() if undo == EXACT else None
    if not norm_preserving:
        (ops.orthogonalize_ if layout == families.MATRIX else ops.ablate_)(tensor, edit.direction, edit.scale)
    elif layout == families.MATRIX:
        ops.orthogonalize_norm_preserving_(tensor, edit.direction, edit.scale, axis="column")
    else:
        _ablate_rows_norm_preserving_(tensor, edit.direction, edit.scale)
    if projection is None:
        return None
    version = writer.parameter._version
    entry = UndoEntry(writer.name, writer.parameter, layout, edit.direction, edit.scale, projection, version, norms)
    if original is None:
        return entry
    return replace(entry, fixes=_fixes(entry, original))


def check_structure(
    model: nn.Module,
    direction: torch.Tensor,
    *,
    include_embeddings: bool = True,
    layers: Sequence[int] | None = None,
    structure: families.StructureSpec | None = None,
) -> None:
    """The self-check of `orthogonalize_model_`, on its own: raise ResidualLeakError (a
    StructureError) naming the first layer that would still write r if every residual writer
    were orthogonalized against `direction` at scale 1. Nothing is changed.

    One short forward pass with the planned edit applied to each writer's output (see
    `refusal_kernels.hf.verify`). It checks the structure read, whatever scale the edit then
    uses: a writer missed, or orthogonalized against the wrong direction, shows up as r in the
    residual stream. A tensor whose module's forward does not compute it is edited for the
    pass and put back bit for bit.
    """
    described, _, edits, directions = _plan(model, direction, 1.0, include_embeddings, layers, structure)
    expected = self_check.expectation(directions, embeddings=_edits_embeddings(edits))
    simulated = {e.writer.module: (e.direction, e.scale) for e in edits if e.writer.in_forward}
    with _edited_for_the_check([e for e in edits if not e.writer.in_forward]):
        self_check.check(model, described, expected, simulated)


@contextmanager
def _edited_for_the_check(edits: list[_Edit]) -> Iterator[None]:
    """Edit these tensors for the self-check and put them back bit for bit: their modules' outputs
    cannot be hooked (the forward is not what computes them), so the check needs the real edit."""
    originals = _storage_copies(edits)
    try:
        with torch.no_grad():
            for edit in edits:
                _edit_(edit, undo=False, norm_preserving=False)
        yield
    finally:
        _put_back(originals)


def _storage_copies(edits: list[_Edit]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, a copy of it) for every tensor the edits write, to put back bit for bit."""
    return [(t, t.detach().clone()) for edit in edits for t in edit.writer.storage]


def _put_back(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, original in copies:
            tensor.copy_(original)


def _edit_(edit: _Edit, undo: bool | str, norm_preserving: bool) -> UndoEntry | None:
    """One writer's edit in its own storage: its format's op when quantized, else the dense edit
    (with undo, returning what restores it)."""
    if edit.writer.quantized is not None:
        edit.writer.quantized.orthogonalize_(edit.direction, edit.scale)
        return None
    return _orthogonalize_dense_(edit, undo, norm_preserving)


def _apply(
    model: nn.Module,
    structure: families.ModelStructure,
    edits: list[_Edit],
    scale: float | Schedule,
    undo: bool | str,
    norm_preserving: bool = False,
) -> OrthogonalizationRecord:
    """Make the planned edits; undo records an UndoEntry for every dense tensor, and undo="exact"
    a copy of every quantized storage tensor written."""
    record = OrthogonalizationRecord(scale=scale, norm_preserving=norm_preserving)
    entries: list[UndoEntry] = []
    copies = _storage_copies([e for e in edits if e.writer.quantized is not None]) if undo == EXACT else []
    if any(e.writer.component == families.EMBEDDING for e in edits) and head_is_tied(model, structure):
        record.untied_head = untie_head(model, structure)
    with torch.no_grad():
        for edit in edits:
            writer, quantized = edit.writer, edit.writer.quantized
            entry = _edit_(edit, undo, norm_preserving)
            if entry is not None:
                entries.append(entry)
            shape, fmt = (
                (tuple(writer.parameter.shape), None) if quantized is None else (quantized.shape, quantized.format)
            )
            record.changed.append(ChangedTensor(writer.name, shape, writer.layout, writer.layer, edit.scale, fmt))
    if undo:
        record.undo = UndoData(model, structure, entries, copies)
    return record


def orthogonalize_model_(
    model: nn.Module,
    direction: torch.Tensor,
    *,
    scale: float | Schedule = 1.0,
    include_embeddings: bool = True,
    layers: Sequence[int] | None = None,
    norm_preserving: bool = False,
    undo: bool | str = False,
    verify: bool = True,
    structure: families.StructureSpec | None = None,
) -> OrthogonalizationRecord:
    """Orthogonalize every residual-stream writer of `model` against `direction`, in place.

    Args:
        model: a transformers causal LM of a supported family (see `families`).
        direction: [d_model], or one per layer [num_layers, d_model]; any float dtype. With one
            per layer, layer i's writers use row i and the embeddings use the row of the
            first selected layer.
        scale: 1 removes the component; see `refusal_kernels.ablate_`. A Schedule gives each
            layer's attention and MLP writers, and the embeddings, their own scale (0 leaves
            them untouched).
        include_embeddings: also orthogonalize the token (and learned position) embedding rows;
            a head tied to the token embedding is untied first and keeps the original matrix.
        layers: only the writers of these layers (embeddings still follow include_embeddings).
        norm_preserving: keep the norm of every residual vector (each matrix column, each row
            of a row layout): v <- ||v|| normalize(v - s (d.v) d). Dense writers only:
            quantized ones raise ValueError naming the first.
        undo: keep what `undo_` needs to restore the weights (O(d_in) per matrix, see the
            module docstring). Quantized writers cannot be restored exactly, since their edit
            requantizes: undo=True raises ValueError naming the first one. undo="exact" adds,
            for each dense tensor, the original value of every element the restore would not
            give back bit for bit (a few percent of the elements), and keeps a copy of each
            quantized storage tensor, so that `undo_` restores everything bit for bit;
            `patch(mode="weights")` uses it. While it edits a tensor it holds one copy of that
            tensor, to find those elements.
        verify: before the first write, run `check_structure`: one short forward pass with every
            writer's output orthogonalized at scale 1, which raises ResidualLeakError (a
            StructureError) naming the first layer that would still write r, leaving the model
            unchanged. It checks the structure whatever `scale` is. False skips it.
        structure: a StructureSpec naming the layers and writers, for a model `describe_model`
            cannot read.

    Quantized projections are edited in their quantized storage (see the module docstring).

    Returns:
        An OrthogonalizationRecord naming every tensor changed, with the undo data if asked.

    Bad arguments raise ValueError/TypeError before any tensor is changed.
    """
    if undo not in UNDO_MODES:
        raise ValueError(f"undo must be False, True or {EXACT!r}, got {undo!r}")
    spec = structure
    structure, scale, edits, _ = _plan(model, direction, scale, include_embeddings, layers, spec)
    if undo is True:
        _check_dense(
            edits,
            "undo=True needs dense weights, since requantizing is not exactly reversible; "
            "patch(mode='weights') restores quantized storage from a copy",
        )
    if norm_preserving:
        _check_dense(edits, "norm_preserving=True needs dense weights: the quantized edits do not keep norms")
    if verify:
        check_structure(model, direction, include_embeddings=include_embeddings, layers=layers, structure=spec)
    return _apply(model, structure, edits, scale, undo, norm_preserving)


def undo_(record: OrthogonalizationRecord) -> None:
    """Restore, in place, the weights that `orthogonalize_model_(..., undo=True or "exact")` changed.

    Each tensor gets its removed component back, W <- W + s d c^T (each row v <- v + s c d for
    a row layout), computed in fp32 one chunk at a time and rounded once to its dtype; a head
    that was untied shares the token embedding again. The record is then spent. After
    undo="exact" every element the restore missed gets its recorded original back and quantized
    storage its copy, so the weights are the original ones bit for bit; after undo=True they
    are within the bound below.

    Restoration error: the edit rounded W - s d c^T once to the storage dtype and the undo
    rounds W' + s d c^T once, so each restored element W_r is within about one rounding step
    of the original W:

        |W_r - W| <= ulp(m) + 2^-23 m + (2 d_model + 8) 2^-24 |s| |d_i| |x|,  m = max(|W'|, |W_r|)

    where ulp(m) is the storage dtype's spacing at m (the power of two at or below m times
    2^-23 for float32, 2^-10 for float16, 2^-7 for bfloat16; the subnormal spacing below the
    normal range), d_i the direction's entry for the element's output and |x| the norm of the
    vector the element belongs to (its matrix column, or its row). ulp(m) covers the two
    roundings, half a step each; the rest is fp32 arithmetic: c = d^T x is accumulated by the
    edit's kernel and by the record in different orders, each within d_model 2^-24 |x| of the
    exact value, plus a few roundings of the products and sums. So for float16 and bfloat16 the
    error is about one step, 2^-10 (about 1e-3) and 2^-7 (about 8e-3) of the element's magnitude.
    For float32 the fp32 terms dominate: a few 2^-24 of |s d_i| |x|, the size of the removed
    component, which for an element much smaller than that is many steps of its own.
    tests/test_hf_weights.py checks this bound on every element of tiny models of four families.

    After a norm-preserving edit each vector is first scaled back by f = ||x - s c d|| / ||x||
    (found from the recorded ||x|| and c), then gets s c d back. The rounding term becomes
    max(1, f) ulp(m), and the rescaling adds (2 d_model + 8) 2^-24 |W'| / f: computing f
    subtracts (2s - s^2) c^2 from ||x||^2, which loses precision when the vector lay almost
    along d (small f). A vector the edit emptied (f <= 2^-8, set to zero as
    `orthogonalize_norm_preserving_` does) comes back as s c d, off by its tiny remainder.

    Args:
        record: the OrthogonalizationRecord of orthogonalize_model_(..., undo=True or "exact").

    Raises:
        TypeError: record is not an OrthogonalizationRecord.
        ValueError: the record holds no undo data, or was already undone, or a tensor it
            restores was changed in place since the edit (named; nothing is restored then).
    """
    if not isinstance(record, OrthogonalizationRecord):
        raise TypeError(f"record must be an OrthogonalizationRecord, got {type(record).__name__}")
    data = record.undo
    if data is None:
        raise ValueError("record holds no undo data: pass undo=True to orthogonalize_model_")
    if data.spent:
        raise ValueError("record was already undone: its undo data is spent")
    for entry in data.entries:
        if entry.tensor._version != entry.version:
            raise ValueError(f"{entry.name} was changed in place after orthogonalize_model_; nothing was restored")
    for entry in data.entries:
        _restore_(entry)
    _put_back(data.copies)
    if record.untied_head is not None:
        retie_head(data.model, data.structure)
    data.entries.clear()
    data.copies.clear()
    data.spent = True
