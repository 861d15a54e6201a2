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


def _orthogonalized(wf: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    return wf - scale * d[:, None] * (d @ wf)[..., None, :]


def orthogonalize(weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """W - scale * d (d^T W) for each [d_model, d_in] matrix in weight's last two dims."""
    return _orthogonalized(weight.float(), unit(direction), scale).to(weight.dtype)


# A vector whose squared norm the update brings to this fraction of its old one or below counts
# as emptied and becomes zero (csrc/norm_preserving.h says why).
EMPTIED_FRACTION = 2.0**-16


def _normalized(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t divided by its norms along dim; zero vectors stay zero."""
    norms = t.norm(dim=dim, keepdim=True)
    return torch.where(norms > 0, t / norms, 0.0)


def _rescaled(updated: torch.Tensor, old: torch.Tensor, norms: torch.Tensor, dim: int) -> torch.Tensor:
    """The vectors of `updated` along dim scaled to `norms`, zero where the update emptied `old`."""
    updated_norms = updated.norm(dim=dim, keepdim=True)
    kept = updated_norms.square() > EMPTIED_FRACTION * old.norm(dim=dim, keepdim=True).square()
    return torch.where(kept, updated * (norms / updated_norms), 0.0)


def orthogonalize_norm_preserving(
    weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0, axis: str = "column"
) -> torch.Tensor:
    """orthogonalize, then give each column (axis="column") or each row (axis="row") its old norm back.

    axis="column": w_j <- ||w_j|| normalize(w_j - scale (d.w_j) d) for every column w_j.
    axis="row" (row-normalized form): divide each row by its norm, orthogonalize that matrix,
    then scale each row back to its original norm.
    A zero vector stays zero, and so does one that the update empties (to EMPTIED_FRACTION of
    its squared norm or less).
    """
    d = unit(direction)
    wf = weight.float()
    dim = -2 if axis == "column" else -1
    old = wf if axis == "column" else _normalized(wf, dim)
    return _rescaled(_orthogonalized(old, d, scale), old, wf.norm(dim=dim, keepdim=True), dim).to(weight.dtype)


def ablate_norm_preserving(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """ablate, then give each vector its old norm back: v <- ||v|| normalize(v - scale (v.d) d).

    The form `hf.orthogonalize_model_(norm_preserving=True)` gives rows (embeddings, biases);
    a vector the update empties becomes zero, as in `orthogonalize_norm_preserving`.
    """
    d = unit(direction)
    xf = x.float()
    return _rescaled(xf - scale * (xf @ d)[..., None] * d, xf, xf.norm(dim=-1, keepdim=True), -1).to(x.dtype)


def ablate_eager_(x: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The one-liner people write in eager PyTorch (in x's dtype): the baseline benchmarks beat."""
    d = direction / direction.norm()
    return x.sub_(scale * (x @ d)[..., None] * d)


def orthogonalize_eager_(weight: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The eager-PyTorch one-liner for a 2-D weight: materializes a d_model x d_in outer product."""
    d = direction / direction.norm()
    return weight.sub_(scale * torch.outer(d, d @ weight))
