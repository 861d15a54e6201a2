"""Pure-PyTorch versions of every op: the single source of truth for tests and benchmarks.

Each function is out of place and computes in fp32, rounding once to the input dtype, which
is what the fused kernels do too.
"""

from __future__ import annotations

import torch


def unit(direction: torch.Tensor) -> torch.Tensor:
    """direction / ||direction|| in fp32, along the last dim."""
    d = direction.float()
    return d / d.norm(dim=-1, keepdim=True)


def ablate(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """v - scale * (v . d) d for every vector v along the last dim of x."""
    d = unit(direction)
    xf = x.float()
    return (xf - scale * (xf @ d)[..., None] * d).to(x.dtype)


def ablate_indexed(x: torch.Tensor, directions: torch.Tensor, index: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """ablate with directions[index] per vector; index -1 leaves the vector as it is.

    index has shape x.shape[:-1], or x.shape[:1] to use one direction per batch row.
    """
    if index.shape != x.shape[:-1]:
        index = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(x.shape[:-1])
    d = unit(directions)[index.clamp(min=0)]
    xf = x.float()
    ablated = xf - scale * (xf * d).sum(-1, keepdim=True) * d
    return torch.where((index >= 0)[..., None], ablated, xf).to(x.dtype)


def orthogonalize(weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """W - scale * d (d^T W) for each [d_model, d_in] matrix in weight's last two dims."""
    d = unit(direction)
    wf = weight.float()
    return (wf - scale * d[:, None] * (d @ wf)[..., None, :]).to(weight.dtype)


def ablate_eager_(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The one-liner people write in eager PyTorch (in x's dtype): the baseline benchmarks beat."""
    d = direction / direction.norm()
    return x.sub_(scale * (x @ d)[..., None] * d)


def orthogonalize_eager_(weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The eager-PyTorch one-liner for a 2-D weight: materializes a d_model x d_in outer product."""
    d = direction / direction.norm()
    return weight.sub_(scale * torch.outer(d, d @ weight))
