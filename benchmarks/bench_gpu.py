"""GPU benchmarks of every op on every backend, written as one JSON file.

Usage: python benchmarks/bench_gpu.py OUT_DIR

Backends: "cuda" (C++ kernels, when built), "triton", "eager" (the PyTorch one-liners in
`reference`; for orthogonalize_norm_preserving the reference itself, copied back in place) and
"torch.compile" (of the out-of-place `reference` functions). Each row holds
the median of RUNS timed runs after warm-up, the bandwidth it implies (one read and one write
of the tensor) and that bandwidth as a share of the measured copy bandwidth and, on H100/H200,
of the spec figure. Without a GPU the script writes a JSON that says why it skipped.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import refusal_kernels
from refusal_kernels import backends, reference

RUNS = 50
WARMUP = 5
SPEC_BANDWIDTH_GBPS = {"H200": 4800.0, "H100": 3350.0}  # HBM spec: H200, H100 SXM

ABLATE_SHAPES = [(1, 4096), (16384, 4096), (65536, 8192)]
ABLATE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ORTHOGONALIZE_SHAPES = [(4096, 4096), (4096, 14336), (8192, 28672), (8, 4096, 14336)]
NORM_PRESERVING_SHAPES = [(4096, 14336), (8, 4096, 14336)]
# The residual-stream writers of Llama-3-8B: 32 o_proj, 32 down_proj and the embedding.
LLAMA_LAYERS, LLAMA_D_MODEL, LLAMA_D_FF, LLAMA_VOCAB = 32, 4096, 14336, 128256


def median_ms(fn: Callable[[], object]) -> float:
    """Median over RUNS of fn's time on the GPU, each run between its own pair of CUDA events."""
    for _ in range(WARMUP):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(RUNS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(RUNS)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends, strict=True))


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 2 GiB: bytes read plus bytes written per second."""
    src = torch.empty(1 << 30, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def fused(name: str, op: str, **options) -> Callable:
    """The public in-place op, run on backend `name`."""

    def run(*args):
        refusal_kernels.set_backend(name)
        try:
            getattr(refusal_kernels, op)(*args, **options)
        finally:
            refusal_kernels.set_backend(None)

    return run


def _eager_orthogonalize(weight: torch.Tensor, direction: torch.Tensor) -> None:
    for matrix in weight.reshape(-1, *weight.shape[-2:]):
        reference.orthogonalize_eager_(matrix, direction)


def _eager_norm_preserving(**options) -> Callable:
    """The reference in place: there is no shorter eager form."""

    def run(weight: torch.Tensor, direction: torch.Tensor) -> None:
        weight.copy_(reference.orthogonalize_norm_preserving(weight, direction, **options))

    return run


def implementations(op: str, **options) -> dict[str, Callable]:
    """backend name -> fn(tensor, direction) for op "ablate", "orthogonalize" or "orthogonalize_norm_preserving"."""
    fns = {}
    if backends.has_cuda_kernels():
        fns["cuda"] = fused("cuda", f"{op}_", **options)
    if importlib.util.find_spec("triton"):
        fns["triton"] = fused("triton", f"{op}_", **options)
    fns["eager"] = {
        "ablate": reference.ablate_eager_,
        "orthogonalize": _eager_orthogonalize,
        "orthogonalize_norm_preserving": _eager_norm_preserving(**options),
    }[op]
    compiled = torch.compile(getattr(reference, op))
    fns["torch.compile"] = lambda *args: compiled(*args, **options)
    return fns


def row(op: str, shape, dtype: torch.dtype, backend: str, ms: float, bytes_moved: int, peaks: dict, **options) -> dict:
    gbps = bytes_moved / ms / 1e6
    return {
        "op": op,
        **options,
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "median_ms": round(ms, 4),
        "gb_per_s": round(gbps, 1),
        **{f"pct_of_{name}": round(100 * gbps / peak, 1) for name, peak in peaks.items()},
    }


def bench_single(op: str, shape, dtype: torch.dtype, peaks: dict, **options) -> list[dict]:
    tensor = torch.randn(shape, device="cuda", dtype=dtype)
    # In the tensor's dtype: the eager one-liners cannot mix dtypes in a matmul.
    direction = torch.randn(shape[-1] if op == "ablate" else shape[-2], device="cuda", dtype=dtype)
    rows = []
    for backend, fn in implementations(op, **options).items():
        ms = median_ms(lambda fn=fn: fn(tensor, direction))
        rows.append(row(op, shape, dtype, backend, ms, 2 * tensor.numel() * tensor.element_size(), peaks, **options))
        print(rows[-1], flush=True)
    return rows


def bench_llama(peaks: dict) -> list[dict]:
    """Orthogonalize every o_proj and down_proj and ablate the embedding rows, timed as one total."""
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    o_proj = [torch.randn(LLAMA_D_MODEL, LLAMA_D_MODEL, **bf16) for _ in range(LLAMA_LAYERS)]
    down_proj = [torch.randn(LLAMA_D_MODEL, LLAMA_D_FF, **bf16) for _ in range(LLAMA_LAYERS)]
    embedding = torch.randn(LLAMA_VOCAB, LLAMA_D_MODEL, **bf16)
    direction = torch.randn(LLAMA_D_MODEL, **bf16)
    bytes_moved = 2 * sum(w.numel() * w.element_size() for w in [*o_proj, *down_proj, embedding])
    ablate_fns, orthogonalize_fns = implementations("ablate"), implementations("orthogonalize")
    rows = []
    for backend in ablate_fns:

        def whole_model(ablate=ablate_fns[backend], orthogonalize=orthogonalize_fns[backend]):
            for weight in o_proj + down_proj:
                orthogonalize(weight, direction)
            ablate(embedding, direction)

        ms = median_ms(whole_model)
        shape = ["llama-3-8b residual writers", LLAMA_LAYERS, LLAMA_D_MODEL, LLAMA_D_FF, LLAMA_VOCAB]
        rows.append(row("orthogonalize_model", shape, torch.bfloat16, backend, ms, bytes_moved, peaks))
        print(rows[-1], flush=True)
    return rows


def environment() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if importlib.util.find_spec("triton"):
        import triton

        info["triton"] = triton.__version__
    return info


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "bench_gpu.json"
    if not torch.cuda.is_available():
        reason = "no CUDA device: GPU benchmarks skipped"
        print(reason)
        out_file.write_text(json.dumps({**environment(), "skipped": reason}, indent=2))
        return

    began = time.perf_counter()
    device = torch.cuda.get_device_name()
    peaks = {"measured_copy": copy_bandwidth_gbps()}
    spec = next((gbps for name, gbps in SPEC_BANDWIDTH_GBPS.items() if name in device), None)
    if spec is not None:
        peaks["spec"] = spec
    # Every shape and dtype is a recompile of the same reference function; past the limit,
    # dynamo would silently run it eagerly and the "torch.compile" rows would lie.
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for shape in ABLATE_SHAPES:
        for dtype in ABLATE_DTYPES:
            rows += bench_single("ablate", shape, dtype, peaks)
    for shape in ORTHOGONALIZE_SHAPES:
        rows += bench_single("orthogonalize", shape, torch.bfloat16, peaks)
    for axis in ("column", "row"):
        for shape in NORM_PRESERVING_SHAPES:
            rows += bench_single("orthogonalize_norm_preserving", shape, torch.bfloat16, peaks, axis=axis)
    rows += bench_llama(peaks)
    result = {
        "device": device,
        **environment(),
        "peak_gb_per_s": {name: round(gbps, 1) for name, gbps in peaks.items()},
        "runs_per_median": RUNS,
        "seconds": round(time.perf_counter() - began, 1),
        "rows": rows,
    }
    out_file.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
