"""A one-minute tour of the core ops on random data: `python -m refusal_kernels.demo`.

It plants a direction in a batch of activations, removes it with the fused in-place op,
prints the projections before and after, and times the kernel against eager PyTorch.
"""

from __future__ import annotations

import argparse
import time

import torch

import refusal_kernels as rk
from refusal_kernels import reference


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    r = torch.randn(args.dim)
    r_hat = r / r.norm()
    x = (torch.randn(args.rows, args.dim) + 3.0 * torch.randn(args.rows, 1) * r_hat).to(dtype)
    print(f"activations {list(x.shape)} {args.dtype}, direction r of norm {r.norm():.1f}")
    print(f"mean |x.r_hat| before ablation: {(x.float() @ r_hat).abs().mean():.4f}")
    rk.ablate_(x, r)
    print(f"mean |x.r_hat| after ablation:  {(x.float() @ r_hat).abs().mean():.2e}")

    fused = median_ms(lambda: rk.ablate_(x, r), 10)
    eager = median_ms(lambda: reference.ablate_eager_(x, r), 5)
    gbytes = 2 * x.numel() * x.element_size() / 1e9
    print(f"fused ablate_: {fused:.2f} ms ({gbytes / fused * 1e3:.1f} GB/s)")
    print(f"eager x.sub_((x @ d)[..., None] * d): {eager:.2f} ms -> {eager / fused:.1f}x faster")

    weight = torch.randn(args.dim, 4 * args.dim, dtype=dtype)
    rk.orthogonalize_(weight, r)
    print(
        f"orthogonalize_: max |r_hat^T W| on a {list(weight.shape)} weight: {(r_hat @ weight.float()).abs().max():.2e}"
    )


if __name__ == "__main__":
    main()
