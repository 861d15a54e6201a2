"""Per-dtype tolerances shared by the op tests.

Kernels and the reference both accumulate in fp32 and round once; they differ only in
summation order, so a result may land one rounding step away: tolerances allow two steps.
"""

import torch

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}

DTYPES = tuple(TOLERANCES)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[actual.dtype])
