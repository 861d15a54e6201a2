"""The C++ kernels (CPU, and CUDA in a CUDA build), through the torch dispatcher."""

import torch

ablate_ = torch.ops.refusal.ablate
ablate_indexed_ = torch.ops.refusal.ablate_indexed
orthogonalize_ = torch.ops.refusal.orthogonalize
orthogonalize_norm_preserving_ = torch.ops.refusal.orthogonalize_norm_preserving
