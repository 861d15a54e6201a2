"""Bad input: a ValueError or TypeError naming the argument, and the target left bit-for-bit."""

import functools
from types import SimpleNamespace

import pytest
import torch
from kquant_cases import FP16_OFFSETS
from op_samples import GGUF_TYPES, REFERENCES, api, run

import refusal_kernels as rk
from refusal_kernels.quant import gguf

D = 8


def rows():
    return torch.randn(4, D)


def weight():
    return torch.randn(D, 5)


def good_index():
    return torch.tensor([0, 1, -1, 0])


CASES = {
    "ablate: direction too long": (rows, lambda ops, x: ops.ablate_(x, torch.randn(D + 1)), ValueError, "direction"),
    "ablate: direction 2-D": (rows, lambda ops, x: ops.ablate_(x, torch.randn(1, D)), ValueError, "direction"),
    "ablate: zero direction": (rows, lambda ops, x: ops.ablate_(x, torch.zeros(D)), ValueError, "direction"),
    "ablate: NaN direction": (
        rows,
        lambda ops, x: ops.ablate_(x, torch.full((D,), float("nan"))),
        ValueError,
        "direction",
    ),
    "ablate: Inf direction": (
        rows,
        lambda ops, x: ops.ablate_(x, torch.tensor([float("inf")] + [0.0] * (D - 1))),
        ValueError,
        "direction",
    ),
    "ablate: integer direction": (
        rows,
        lambda ops, x: ops.ablate_(x, torch.ones(D, dtype=torch.int64)),
        TypeError,
        "direction",
    ),
    "ablate: integer x": (
        lambda: torch.ones(4, D, dtype=torch.int32),
        lambda ops, x: ops.ablate_(x, torch.randn(D)),
        TypeError,
        "x",
    ),
    "ablate: bool x": (
        lambda: torch.ones(4, D, dtype=torch.bool),
        lambda ops, x: ops.ablate_(x, torch.randn(D)),
        TypeError,
        "x",
    ),
    "ablate: complex x": (
        lambda: torch.randn(4, D, dtype=torch.complex64),
        lambda ops, x: ops.ablate_(x, torch.randn(D)),
        TypeError,
        "x",
    ),
    "ablate: float64 x": (
        lambda: torch.randn(4, D, dtype=torch.float64),
        lambda ops, x: ops.ablate_(x, torch.randn(D)),
        TypeError,
        "x",
    ),
    "ablate: direction on another device": (
        rows,
        lambda ops, x: ops.ablate_(x, torch.randn(D, device="meta")),
        ValueError,
        "direction",
    ),
    "ablate: last-dim stride 2": (
        lambda: torch.randn(4, 2 * D),
        lambda ops, x: ops.ablate_(x[:, ::2], torch.randn(D)),
        ValueError,
        "stride",
    ),
    "ablate: overlapping rows": (
        lambda: torch.randn(1, D),
        lambda ops, x: ops.ablate_(x.expand(4, D), torch.randn(D)),
        ValueError,
        "overlap",
    ),
    "ablate: NaN scale": (rows, lambda ops, x: ops.ablate_(x, torch.randn(D), float("nan")), ValueError, "scale"),
    "ablate: infinite scale": (rows, lambda ops, x: ops.ablate_(x, torch.randn(D), float("inf")), ValueError, "scale"),
    "ablate_indexed: directions 1-D": (
        rows,
        lambda ops, x: ops.ablate_indexed_(x, torch.randn(D), good_index()),
        ValueError,
        "directions",
    ),
    "ablate_indexed: directions wrong width": (
        rows,
        lambda ops, x: ops.ablate_indexed_(x, torch.randn(2, D - 1), good_index()),
        ValueError,
        "directions",
    ),
    "ablate_indexed: one zero direction": (
        rows,
        lambda ops, x: ops.ablate_indexed_(x, torch.stack([torch.randn(D), torch.zeros(D)]), good_index()),
        ValueError,
        "directions",
    ),
    "ablate_indexed: index too large": (
        rows,
        lambda ops, x: ops.ablate_indexed_(x, torch.randn(2, D), torch.tensor([0, 1, 2, 0])),
        ValueError,
        "index",
    ),
    "ablate_indexed: index below -1": (
        rows,
        lambda ops, x: ops.ablate_indexed_(x, torch.randn(2, D), torch.tensor([0, -2, 1, 0])),
        ValueError,
        "index",
    ),
    "ablate_indexed: int32 index": (
        rows,
        lambda ops, x: ops.ablate_indexed_(x, torch.randn(2, D), good_index().int()),
        TypeError,
        "index",
    ),
    "ablate_indexed: index wrong shape": (
        rows,
        lambda ops, x: ops.ablate_indexed_(x, torch.randn(2, D), torch.tensor([0, 1])),
        ValueError,
        "index",
    ),
    "ablate_indexed: index on another device": (
        rows,
        lambda ops, x: ops.ablate_indexed_(x, torch.randn(2, D), good_index().to("meta")),
        ValueError,
        "index",
    ),
    "orthogonalize: 1-D weight": (
        lambda: torch.randn(D),
        lambda ops, w: ops.orthogonalize_(w, torch.randn(D)),
        ValueError,
        "weight",
    ),
    "orthogonalize: direction of d_in": (
        weight,
        lambda ops, w: ops.orthogonalize_(w, torch.randn(5)),
        ValueError,
        "direction",
    ),
    "orthogonalize: zero direction": (
        weight,
        lambda ops, w: ops.orthogonalize_(w, torch.zeros(D)),
        ValueError,
        "direction",
    ),
    "orthogonalize: integer weight": (
        lambda: torch.ones(D, 5, dtype=torch.int8),
        lambda ops, w: ops.orthogonalize_(w, torch.randn(D)),
        TypeError,
        "weight",
    ),
    "orthogonalize: NaN scale": (
        weight,
        lambda ops, w: ops.orthogonalize_(w, torch.randn(D), float("nan")),
        ValueError,
        "scale",
    ),
    "orthogonalize: transposed weight": (
        lambda: torch.randn(5, D),
        lambda ops, w: ops.orthogonalize_(w.t(), torch.randn(D)),
        ValueError,
        "stride",
    ),
    "orthogonalize: Inf direction": (
        weight,
        lambda ops, w: ops.orthogonalize_(w, torch.tensor([float("inf")] + [0.0] * (D - 1))),
        ValueError,
        "direction",
    ),
    "orthogonalize: float64 weight": (
        lambda: torch.randn(D, 5, dtype=torch.float64),
        lambda ops, w: ops.orthogonalize_(w, torch.randn(D)),
        TypeError,
        "weight",
    ),
    "orthogonalize: direction on another device": (
        weight,
        lambda ops, w: ops.orthogonalize_(w, torch.randn(D, device="meta")),
        ValueError,
        "direction",
    ),
    "orthogonalize: overlapping rows": (
        lambda: torch.randn(1, 5),
        lambda ops, w: ops.orthogonalize_(w.expand(D, 5), torch.randn(D)),
        ValueError,
        "overlap",
    ),
}


def _norm_preserving_cases() -> dict:
    """Every orthogonalize case, run through orthogonalize_norm_preserving_ with either axis."""

    def with_axis(call, axis):
        def run(ops, w):
            norm_preserving = functools.partial(ops.orthogonalize_norm_preserving_, axis=axis)
            return call(SimpleNamespace(orthogonalize_=norm_preserving), w)

        return run

    return {
        f"orthogonalize_norm_preserving {axis}: {name.removeprefix('orthogonalize: ')}": (
            make_target,
            with_axis(call, axis),
            error,
            named,
        )
        for name, (make_target, call, error, named) in CASES.items()
        if name.startswith("orthogonalize:")
        for axis in ("column", "row")
    }


CASES.update(_norm_preserving_cases())
CASES["orthogonalize_norm_preserving: unknown axis"] = (
    weight,
    lambda ops, w: ops.orthogonalize_norm_preserving_(w, torch.randn(D), 1.0, "diagonal"),
    ValueError,
    "axis",
)


# GGUF blocks: GGUF_ROWS rows of two blocks each.
GGUF_ROWS = 4


def _gguf_blocks(type_name: str, magnitude: float = 1.0) -> torch.Tensor:
    values = torch.randn(GGUF_ROWS, 2 * gguf.FORMATS[type_name][0], generator=torch.Generator().manual_seed(0))
    return gguf.quantize(magnitude * values, type_name)


def _with_infinite_scale(type_name: str) -> torch.Tensor:
    blocks = _gguf_blocks(type_name)
    offset = FP16_OFFSETS.get(type_name, (0,))[0]  # the fp16 d of the first block (legacy types: at 0)
    blocks[1, offset : offset + 2] = torch.tensor([float("inf")], dtype=torch.float16).view(torch.uint8)
    return blocks


def _gguf_cases(op: str, type_name: str) -> dict:
    """Each bad input of refusal::<op>, through `ops.<op>_(blocks, direction, scale, layout)`."""
    row_length = 2 * gguf.FORMATS[type_name][0]
    blocks = functools.partial(_gguf_blocks, type_name)
    large = functools.partial(_gguf_blocks, type_name, 100.0)

    def call(direction=None, scale=1.0, layout="matrix", view=lambda b: b, passes=0):
        def run_op(ops, b):
            d = torch.randn(GGUF_ROWS) if direction is None else direction
            return getattr(ops, f"{op}_")(view(b), d, scale, layout, passes)

        return run_op

    cases = {
        "float blocks": (lambda: blocks().float(), call(), TypeError, "blocks"),
        "1-D blocks": (lambda: blocks().reshape(-1), call(), ValueError, "blocks must be 2-D"),
        "non-contiguous blocks": (blocks, call(view=lambda b: b[:, ::2]), ValueError, "blocks must be contiguous"),
        "a partial block per row": (lambda: blocks()[:, 1:].contiguous(), call(), ValueError, "bytes per row"),
        "direction too long": (blocks, call(torch.randn(GGUF_ROWS + 1)), ValueError, "direction"),
        "rows layout, direction over the rows": (blocks, call(layout="rows"), ValueError, "direction"),
        "2-D direction": (blocks, call(torch.randn(1, GGUF_ROWS)), ValueError, "direction"),
        "integer direction": (blocks, call(torch.ones(GGUF_ROWS, dtype=torch.int64)), TypeError, "direction"),
        "direction on another device": (blocks, call(torch.randn(GGUF_ROWS, device="meta")), ValueError, "direction"),
        "zero direction": (blocks, call(torch.zeros(GGUF_ROWS)), ValueError, "direction"),
        "NaN direction": (blocks, call(torch.full((GGUF_ROWS,), float("nan"))), ValueError, "direction"),
        "Inf direction, rows layout": (
            blocks,
            call(torch.tensor([float("inf")] + [0.0] * (row_length - 1)), layout="rows"),
            ValueError,
            "direction",
        ),
        "NaN scale": (blocks, call(scale=float("nan")), ValueError, "scale"),
        "infinite scale": (blocks, call(scale=float("inf")), ValueError, "scale"),
        "unknown layout": (blocks, call(layout="columns"), ValueError, "layout"),
        "negative passes": (blocks, call(passes=-1), ValueError, "passes"),
        # Data every entry point reads: the values themselves.
        "a block with an infinite d": (
            functools.partial(_with_infinite_scale, type_name),
            call(),
            ValueError,
            "blocks must dequantize to finite values",
        ),
        # scale * d_i stays finite, its product with some c_j does not.
        "a scale that overflows float32": (large, call(torch.ones(GGUF_ROWS), scale=3e38), ValueError, "blocks"),
        "rows layout, a scale that overflows float32": (
            large,
            call(torch.ones(row_length), scale=3e38, layout="rows"),
            ValueError,
            "blocks",
        ),
    }
    return {f"{op}: {name}": case for name, case in cases.items()}


for _op, _type_name in GGUF_TYPES.items():
    CASES.update(_gguf_cases(_op, _type_name))


class _Api(SimpleNamespace):
    """The package's public functions, and those of the GGUF ops (refusal_kernels.quant.gguf)."""

    def __getattr__(self, name):
        return getattr(rk, name)


# The same checks hold for the public API, for the C++ kernels called through the dispatcher,
# and for the reference kernel every device without its own runs ("fallback"). The fallback
# checks metadata only: the data (a zero or non-finite direction, an index out of range) is
# checked by the CPU kernel and, for GPU tensors, by the public wrapper.
ENTRY_POINTS = {
    "api": _Api(**{f"{op}_": api(op) for op in GGUF_TYPES}),
    "torch.ops": SimpleNamespace(
        ablate_=torch.ops.refusal.ablate,
        ablate_indexed_=torch.ops.refusal.ablate_indexed,
        orthogonalize_=torch.ops.refusal.orthogonalize,
        orthogonalize_norm_preserving_=torch.ops.refusal.orthogonalize_norm_preserving,
        **{f"{op}_": getattr(torch.ops.refusal, op) for op in GGUF_TYPES},
    ),
    "fallback": SimpleNamespace(
        **{f"{op}_": functools.partial(run, "fallback", op) for op in REFERENCES},
    ),
}
DATA_CASES = ("zero", "NaN", "Inf", "index too large", "index below -1")


def _runs_on(entry_point: str, case: str) -> bool:
    return entry_point != "fallback" or not any(word in case for word in DATA_CASES)


@pytest.mark.parametrize(
    ("entry_point", "case"), [(e, c) for e in ENTRY_POINTS for c in CASES if _runs_on(e, c)], ids=lambda v: v
)
def test_bad_input_raises_and_leaves_target(case, entry_point):
    make_target, call, error, named = CASES[case]
    target = make_target()
    before = target.clone()
    with pytest.raises(error, match=named):
        call(ENTRY_POINTS[entry_point], target)
    assert torch.equal(target, before)
