"""One table of sample inputs per op, shared by every op test and every backend.

As pytorch/extension-cpp's `sample_inputs`: the correctness tests (tests/test_ops.py on CPU,
tests/test_ops_gpu.py on CUDA, tests/triton_interpreter_cases.py under the Triton
interpreter), opcheck and torch.compile (tests/test_ops_registration.py) all read `SAMPLES`,
and `run` calls the op through the entry point a `backend` names.

Each sample builds a buffer and a view of it: the op runs on the view, and the whole buffer
is compared with the reference's result written into the view, so a write outside the view
fails the test too. Values come from a seeded CPU generator, so every device sees the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from kquant_cases import grid
from tolerances import assert_close

import refusal_kernels as rk
from refusal_kernels import reference
from refusal_kernels.quant import gguf
from refusal_kernels.quant.gguf import feedback, legacy

REFERENCES = {
    "ablate": reference.ablate,
    "ablate_indexed": reference.ablate_indexed,
    "orthogonalize": reference.orthogonalize,
    "orthogonalize_norm_preserving": reference.orthogonalize_norm_preserving,
}
# The wrapper's own ways in: "api" the public function (on any device, the kernel the
# dispatcher picks), "fallback" the reference kernel every device without its own runs,
# "triton" the Triton kernel itself (CPU tensors under TRITON_INTERPRET=1).
CPU_BACKENDS = ("api", "fallback")
FALLBACK_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def _whole(buffer: torch.Tensor) -> torch.Tensor:
    return buffer


@dataclass(frozen=True)
class Sample:
    op: str
    name: str
    target_shape: tuple[int, ...]  # the buffer the op's target is a view of
    build_rest: Callable[[torch.Tensor, torch.Generator], tuple]  # the other arguments, from the target
    view_of: Callable[[torch.Tensor], torch.Tensor] = _whole
    # Sizes that exercise a GPU kernel's tiling are too slow for the Triton interpreter.
    interpret: bool = True
    # The buffer from (target_shape, generator, dtype); None: standard normal values in dtype.
    build_buffer: Callable[[tuple[int, ...], torch.Generator, torch.dtype], torch.Tensor] | None = None

    def __str__(self) -> str:
        return f"{self.op}-{self.name}"


@dataclass
class SampleInputs:
    buffer: torch.Tensor
    args: tuple  # the op's arguments; args[0] is view_of(buffer)
    view_of: Callable[[torch.Tensor], torch.Tensor]

    def expected_buffer(self, op: str) -> torch.Tensor:
        """The buffer as the reference leaves it (computed before the op runs)."""
        expected = self.buffer.clone()
        self.view_of(expected).copy_(REFERENCES[op](*self.args))
        return expected


def make(sample: Sample, device: str, dtype: torch.dtype, seed: int = 0) -> SampleInputs:
    generator = torch.Generator().manual_seed(seed)
    if sample.build_buffer is None:
        buffer = torch.randn(sample.target_shape, generator=generator).to(dtype)
    else:
        buffer = sample.build_buffer(sample.target_shape, generator, dtype)
    rest = sample.build_rest(sample.view_of(buffer), generator)
    to_device = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in rest)
    buffer = buffer.to(device)
    return SampleInputs(buffer, (sample.view_of(buffer), *to_device), sample.view_of)


def api(op: str) -> Callable[..., torch.Tensor]:
    """The public in-place function of refusal::<op>, called with the op's own arguments."""
    if op in GGUF_TYPES:
        return functools.partial(_gguf_api, GGUF_TYPES[op])
    return getattr(rk, f"{op}_")


def run(backend: str, op: str, *args, **kwargs) -> None:
    """refusal::<op>(*args) through the entry point `backend` names (see CPU_BACKENDS)."""
    if backend == "fallback":
        getattr(torch.ops.refusal, op).default.redispatch(FALLBACK_KEYS, *args, **kwargs)
    elif backend == "triton":
        from refusal_kernels.backends import triton

        getattr(triton, f"{op}_")(*args, **kwargs)
    else:
        api(op)(*args, **kwargs)


def assert_buffer_close(op: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """A result against the reference's: within the dtype's tolerance; GGUF blocks dequantized, see
    `assert_gguf_close`."""
    if op in GGUF_TYPES:
        assert_gguf_close(actual, expected, GGUF_TYPES[op])
    else:
        assert_close(actual, expected)


def check(backend: str, sample: Sample, device: str, dtype: torch.dtype) -> None:
    """Run the sample on `backend` and compare the whole buffer with the reference's."""
    inputs = make(sample, device, dtype)
    expected = inputs.expected_buffer(sample.op)
    run(backend, sample.op, *inputs.args)
    assert_buffer_close(sample.op, inputs.buffer, expected)


def _direction(scale: float = 1.0, dtype: torch.dtype = torch.float32):
    def rest(target: torch.Tensor, generator: torch.Generator) -> tuple:
        return torch.randn(target.shape[-1], generator=generator).to(dtype), scale

    return rest


def _weight_direction(scale: float = 1.0, dtype: torch.dtype = torch.float32, axis: str | None = None):
    def rest(target: torch.Tensor, generator: torch.Generator) -> tuple:
        direction = torch.randn(target.shape[-2], generator=generator).to(dtype)
        return (direction, scale) if axis is None else (direction, scale, axis)

    return rest


def _indexed(
    num_directions: int,
    per_batch_row: bool = False,
    scale: float = 1.0,
    strided: bool = False,
    column_major: bool = False,
):
    def rest(target: torch.Tensor, generator: torch.Generator) -> tuple:
        d = target.shape[-1]
        directions = torch.randn(num_directions, 2 * d if strided else d, generator=generator)
        index_shape = target.shape[:1] if per_batch_row else target.shape[:-1]
        index = torch.randint(-1, num_directions, (2, *index_shape) if strided else index_shape, generator=generator)
        if strided:  # every other column of the directions, and an index that is a slice too
            directions, index = directions[:, ::2], index[1]
        if column_major:  # directions and index both transposed views
            directions = directions.t().contiguous().t()
            index = index.transpose(0, 1).contiguous().transpose(0, 1)
        if index.numel():
            index[(0,) * index.dim()] = -1
        return directions, index, scale

    return rest


# Rows: 1 and 7 pack many rows to a program or warp; 4097 is one padded row; 16385 takes the
# chunked paths. Views: padded rows, every other token, transposed leading dims.
ABLATE = [
    Sample("ablate", "1x1", (1, 1), _direction()),
    Sample("ablate", "5x7-scale0.3", (5, 7), _direction(0.3)),
    Sample("ablate", "3x4097-reflect", (3, 4097), _direction(2.0)),
    Sample("ablate", "3x16385", (3, 16385), _direction(0.5)),
    Sample("ablate", "6-dims", (2, 3, 4, 5, 6, 7), _direction()),
    Sample("ablate", "one-vector", (9,), _direction()),
    Sample("ablate", "empty-rows", (0, 16), _direction()),
    Sample("ablate", "empty-middle", (2, 0, 9), _direction()),
    Sample("ablate", "bf16-direction", (5, 33), _direction(1.0, torch.bfloat16)),
    Sample("ablate", "f64-direction", (5, 33), _direction(1.0, torch.float64)),
    Sample("ablate", "padded-rows", (3, 7, 4112), _direction(2.0), lambda b: b[:, :5, 3:4100]),
    Sample("ablate", "every-other-token", (3, 7, 4112), _direction(), lambda b: b[:, ::2, 8:-8]),
    Sample("ablate", "transposed-leading", (3, 7, 4112), _direction(), lambda b: b.transpose(0, 1)[..., :4097]),
    # Views the Triton launcher lays out in two levels, and one with three strides, which it
    # edits through a contiguous copy.
    Sample("ablate", "every-other-row", (6, 20), _direction(2.0), lambda b: b[::2, 3:10]),
    Sample("ablate", "padded-3d", (3, 5, 40), _direction(2.0), lambda b: b[:, :4, :33]),
    Sample("ablate", "transposed-padded", (4, 3, 40), _direction(2.0), lambda b: b.transpose(0, 1)[..., 5:38]),
    Sample("ablate", "three-strides", (2, 3, 5, 40), _direction(2.0), lambda b: b[:, :2, :4, :33]),
    Sample("ablate", "padded-16394", (2, 3, 16394), _direction(2.0), lambda b: b[:, 1:, 3:-6]),
]
ABLATE_INDEXED = [
    Sample("ablate_indexed", "per-vector-K1", (5, 6, 7), _indexed(1)),
    Sample("ablate_indexed", "per-vector-K64", (5, 6, 7), _indexed(64, scale=0.5)),
    Sample("ablate_indexed", "per-vector-4097", (3, 2, 4097), _indexed(4)),
    Sample("ablate_indexed", "per-vector-16385", (3, 16385), _indexed(3)),
    Sample("ablate_indexed", "per-batch-row", (5, 6, 33), _indexed(4, per_batch_row=True)),
    Sample("ablate_indexed", "per-batch-row-K64", (5, 6, 7), _indexed(64, per_batch_row=True, scale=2.0)),
    Sample(
        "ablate_indexed", "per-batch-row-padded", (5, 6, 40), _indexed(4, per_batch_row=True), lambda b: b[:, :4, 2:35]
    ),
    Sample("ablate_indexed", "column-major-directions", (3, 4, 10), _indexed(8, column_major=True)),
    Sample("ablate_indexed", "strided-index-and-directions", (4, 3, 9), _indexed(5, strided=True)),
    Sample("ablate_indexed", "strided-rows", (4, 6, 40), _indexed(3), lambda b: b[:, ::2, 3:-3]),
    Sample("ablate_indexed", "empty", (0, 8), _indexed(2)),
]
ORTHOGONALIZE_SHAPES = {
    "1x1": (1, 1),
    "5x1": (5, 1),
    "1x9": (1, 9),
    "7x5": (7, 5),
    "100x300": (100, 300),
    "33x4097": (33, 4097),
    "experts-3x9x17": (3, 9, 17),
    "4-dims": (2, 2, 4, 6),
    "empty": (5, 0),
}
STRIDED_EXPERTS = ((4, 260, 520), lambda b: b[:, 2:258, 5:505])
EVERY_OTHER_EXPERT = ((6, 9, 30), lambda b: b[::2, :, 1:24])
# Padded experts (two strides), and a 4-D stack whose leading dims need three strides.
PADDED_EXPERTS = ((3, 40, 320), lambda b: b[:, :37, 5:305])
FOUR_D_STACK = ((2, 3, 12, 20), lambda b: b[:, ::2, :10, :17])
WEIGHT_VIEWS = {"padded-experts": PADDED_EXPERTS, "4d-stack": FOUR_D_STACK}
ORTHOGONALIZE = [
    *(
        Sample("orthogonalize", name, shape, _weight_direction(scale))
        for (name, shape), scale in zip(ORTHOGONALIZE_SHAPES.items(), (1.0, 0.5, 2.0) * 3, strict=True)
    ),
    Sample("orthogonalize", "f16-direction", (8, 12), _weight_direction(1.0, torch.float16)),
    Sample("orthogonalize", "strided-experts", STRIDED_EXPERTS[0], _weight_direction(0.5), STRIDED_EXPERTS[1]),
    Sample("orthogonalize", "every-other-expert", EVERY_OTHER_EXPERT[0], _weight_direction(), EVERY_OTHER_EXPERT[1]),
    *(
        Sample("orthogonalize", name, shape, _weight_direction(0.5, torch.bfloat16), view)
        for name, (shape, view) in WEIGHT_VIEWS.items()
    ),
]
NORM_PRESERVING = (
    [
        Sample("orthogonalize_norm_preserving", f"{axis}-{name}", shape, _weight_direction(scale, axis=axis))
        for axis in rk._checks.NORM_AXES
        for (name, shape), scale in zip(ORTHOGONALIZE_SHAPES.items(), (1.0, 0.5, 2.0) * 3, strict=True)
    ]
    + [
        Sample(
            "orthogonalize_norm_preserving",
            f"{axis}-strided-experts",
            STRIDED_EXPERTS[0],
            _weight_direction(0.5, torch.float16, axis),
            STRIDED_EXPERTS[1],
        )
        for axis in rk._checks.NORM_AXES
    ]
    + [
        Sample(
            "orthogonalize_norm_preserving",
            f"{axis}-every-other-expert",
            EVERY_OTHER_EXPERT[0],
            _weight_direction(2.0, axis=axis),
            EVERY_OTHER_EXPERT[1],
        )
        for axis in rk._checks.NORM_AXES
    ]
)
# Shapes that span many GPU tiles and blocks.
LARGE = [
    Sample("ablate", "67x16385", (67, 16385), _direction(0.5), interpret=False),
    Sample("ablate_indexed", "5x6x16385-K64", (5, 6, 16385), _indexed(64, scale=0.5), interpret=False),
    Sample("orthogonalize", "4096x1000", (4096, 1000), _weight_direction(2.0), interpret=False),
    Sample("orthogonalize", "experts-8x512x1111", (8, 512, 1111), _weight_direction(), interpret=False),
    *(
        Sample(
            "orthogonalize_norm_preserving", f"{axis}-{name}", shape, _weight_direction(0.5, axis=axis), interpret=False
        )
        for axis in rk._checks.NORM_AXES
        for name, shape in (("4096x1000", (4096, 1000)), ("experts-8x512x1111", (8, 512, 1111)))
    ),
]


# ---- GGUF blocks: uint8 targets [rows, bytes_per_row], quantized by the reference from values in
# the sample's dtype. The fused kernel sums c = d^T W (or v . d) in another order than the
# reference, so a block whose requantization sits on a tie may land on the other side of it:
# results are compared dequantized, within one quantization step of each value's (sub-)block
# (tests/test_quant_gguf_*.py measure how many blocks are byte-identical).

GGUF_TYPES = {f"orthogonalize_{type_name.lower()}": type_name for type_name in gguf.OP_FORMATS}


def _gguf_api(type_name: str, blocks: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return gguf.orthogonalize_(blocks, type_name, *args, **kwargs)


def _gguf_reference(type_name: str):
    def orthogonalized(blocks, direction, scale=1.0, layout="matrix", passes=0):
        out = blocks.clone()
        feedback.orthogonalize_reference_(gguf.module_of(type_name), out, type_name, direction, scale, layout, passes)
        return out

    return orthogonalized


REFERENCES.update({op: _gguf_reference(type_name) for op, type_name in GGUF_TYPES.items()})


def _fp16_field(superblocks: np.ndarray, offset: int) -> np.ndarray:
    return superblocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float64)


def gguf_steps(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """fp64 [rows, row_length]: the spacing of the levels of each value's block (legacy: |d|) or
    sub-block (K-quants: |d| times the sub-block's scale, from tests/kquant_cases.py's `grid`)."""
    values_per_block, bytes_per_block = gguf.FORMATS[type_name]
    row_length = blocks.shape[1] // bytes_per_block * values_per_block
    if type_name not in legacy.FORMATS:
        # All blocks as one row: grid infers the row length, which it cannot from no rows.
        return grid(blocks.cpu().reshape(1, -1), type_name)[0].abs().reshape(blocks.shape[0], row_length)
    spacing = np.abs(_fp16_field(blocks.cpu().numpy().reshape(-1, bytes_per_block), 0))
    return torch.from_numpy(np.repeat(spacing, values_per_block, axis=1)).reshape(blocks.shape[0], row_length)


def assert_gguf_close(actual: torch.Tensor, expected: torch.Tensor, type_name: str) -> None:
    """Both blocks [rows, bytes_per_row] of type_name, dequantized, within one step of each value's
    (sub-)block: the larger of the two results' steps."""
    assert actual.dtype == expected.dtype == torch.uint8 and actual.shape == expected.shape
    difference = (gguf.dequantize(actual.cpu(), type_name) - gguf.dequantize(expected.cpu(), type_name)).abs()
    step = torch.maximum(gguf_steps(actual, type_name), gguf_steps(expected, type_name))
    assert bool((difference.double() <= step).all()), f"{type_name}: off by {(difference - step).max()} past a step"


# At least this fraction of the blocks the fused kernel writes must be byte-identical to the
# reference's, per layout. "matrix": both sum c = d^T W down the rows in order
# (`_blocks.add_column_component`), so every block is. "rows": v . d differs from torch's W @ d by an ulp in
# most rows (torch's own differs between the whole matrix and one row at a time), which moves
# every value of the row a little; measured 0.983 (Q5_K) to 1.0 of the blocks identical.
IDENTICAL_BLOCKS = {"matrix": 1.0, "rows": 0.98}


def identical_block_fraction(actual: torch.Tensor, expected: torch.Tensor, type_name: str) -> float:
    """The fraction of (super-)blocks whose bytes are the same in both."""
    bytes_per_block = gguf.FORMATS[type_name][1]
    same = (actual.reshape(-1, bytes_per_block) == expected.reshape(-1, bytes_per_block)).all(dim=1)
    return same.double().mean().item()


def _gguf_blocks(type_name: str):
    def build(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        return gguf.quantize(torch.randn(shape, generator=generator).to(dtype).float(), type_name)

    return build


def _gguf_direction(type_name: str, layout: str, scale: float, dtype: torch.dtype, passes: int):
    values_per_block, bytes_per_block = gguf.FORMATS[type_name]

    def rest(blocks: torch.Tensor, generator: torch.Generator) -> tuple:
        length = blocks.shape[0] if layout == "matrix" else blocks.shape[1] // bytes_per_block * values_per_block
        return torch.randn(length, generator=generator).to(dtype), scale, layout, passes

    return rest


# (name, rows, blocks per row, layout, scale, direction dtype, feedback passes). Rows: one, a few
# and 33 (the CPU kernel splits "matrix" over block columns and "rows" over rows); one block per
# row, three, and many (129 legacy blocks, 17 super-blocks: past any per-block fast path).
GGUF_CASES = [
    ("matrix-1x1", 1, 1, "matrix", 1.0, torch.float32, 0),
    ("matrix-7x3", 7, 3, "matrix", 0.5, torch.float32, 0),
    ("matrix-33xmany", 33, None, "matrix", 2.0, torch.float32, 0),
    ("rows-1x1", 1, 1, "rows", 1.0, torch.float32, 0),
    ("rows-7x3", 7, 3, "rows", 1.0, torch.float32, 0),
    ("rows-33xmany", 33, None, "rows", 0.5, torch.float32, 0),
    ("matrix-7x3-f16-direction", 7, 3, "matrix", 1.0, torch.float16, 0),
    ("matrix-7x3-f64-direction", 7, 3, "matrix", 1.0, torch.float64, 0),
    ("rows-7x3-bf16-direction", 7, 3, "rows", 1.0, torch.bfloat16, 0),
    ("rows-empty", 0, 3, "rows", 1.0, torch.float32, 0),
    ("matrix-33xmany-2-passes", 33, None, "matrix", 1.0, torch.float32, 2),
    ("matrix-7x3-1-pass-half-scale", 7, 3, "matrix", 0.5, torch.float32, 1),
    ("rows-33xmany-2-passes", 33, None, "rows", 1.0, torch.float32, 2),
    ("rows-empty-2-passes", 0, 3, "rows", 1.0, torch.float32, 2),
]
GGUF = [
    Sample(
        op,
        name,
        (rows, (blocks or (129 if type_name in legacy.FORMATS else 17)) * gguf.FORMATS[type_name][0]),
        _gguf_direction(type_name, layout, scale, dtype, passes),
        interpret=False,  # no Triton kernel
        build_buffer=_gguf_blocks(type_name),
    )
    for op, type_name in GGUF_TYPES.items()
    for name, rows, blocks, layout, scale, dtype, passes in GGUF_CASES
]
SAMPLES = ABLATE + ABLATE_INDEXED + ORTHOGONALIZE + NORM_PRESERVING + LARGE + GGUF
