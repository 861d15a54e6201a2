"""Bad input to the quantized ops: a ValueError or TypeError naming the argument, raised by
the C++ kernel and by the Python checks alike, and the quantized storage left bit-for-bit."""

from __future__ import annotations

import pytest
import torch
from quant_cases import GROUP, IN, OUT, clone_state, tensors

from refusal_kernels.quant import awq, fp8, gptq, int8, nf4


def _int8():
    return int8.quantize(torch.randn(OUT, IN))


def _gptq():
    return (*gptq.quantize(torch.randn(OUT, IN), GROUP), None)


def _awq():
    return awq.quantize(torch.randn(OUT, IN), GROUP)


def _fp8():
    return fp8.quantize(torch.randn(OUT, IN), (128, 128))


def _nf4(double_quant=True):
    return nf4.quantize(torch.randn(OUT, IN), 64, double_quant, nested_blocksize=8)


D = torch.randn(OUT)
NAN = torch.full((OUT,), float("nan"))

# name: (make state, call(state, entry) where entry is "kernel" or "reference", error, named argument)
CASES = {
    "int8: direction too short": (_int8, lambda s, e: e(int8)(*s, D[:-1]), ValueError, "direction"),
    "int8: zero direction": (_int8, lambda s, e: e(int8)(*s, torch.zeros(OUT)), ValueError, "direction"),
    "int8: NaN direction": (_int8, lambda s, e: e(int8)(*s, NAN), ValueError, "direction"),
    "int8: integer direction": (_int8, lambda s, e: e(int8)(*s, D.long()), TypeError, "direction"),
    "int8: row_scale wrong length": (_int8, lambda s, e: e(int8)(s[0], s[1][:-1].clone(), D), ValueError, "row_scale"),
    "int8: qweight not int8": (_int8, lambda s, e: e(int8)(s[0].int(), s[1], D), TypeError, "qweight"),
    "int8: infinite scale": (_int8, lambda s, e: e(int8)(*s, D, float("inf")), ValueError, "scale"),
    "gptq: group size does not divide in": (
        _gptq,
        lambda s, e: e(gptq)(*s, D, 36),
        ValueError,
        "group_size",
    ),
    "gptq: scales for another group count": (
        _gptq,
        lambda s, e: e(gptq)(s[0], s[1], s[2][:-1].clone(), None, D, GROUP),
        ValueError,
        "scales",
    ),
    "gptq: qzeros packed the wrong way": (
        _gptq,
        lambda s, e: e(gptq)(s[0], s[1].repeat(1, 8)[:, : OUT // 8 + 1].contiguous(), s[2], None, D, GROUP),
        ValueError,
        "qzeros",
    ),
    "gptq: g_idx wrong length": (
        _gptq,
        lambda s, e: e(gptq)(*s[:3], torch.zeros(IN - 1, dtype=torch.int32), D, GROUP),
        ValueError,
        "g_idx",
    ),
    "gptq: g_idx out of range": (
        _gptq,
        lambda s, e: e(gptq)(*s[:3], torch.full((IN,), IN // GROUP, dtype=torch.int32), D, GROUP),
        ValueError,
        "g_idx",
    ),
    "gptq: unknown zeros_format": (
        _gptq,
        lambda s, e: e(gptq)(*s, D, GROUP, 1.0, "v3"),
        ValueError,
        "zeros_format",
    ),
    "gptq: zeros_format spelled as GPTQModel's number": (
        _gptq,
        lambda s, e: e(gptq)(*s, D, GROUP, 1.0, 2),
        ValueError,
        "zeros_format",
    ),
    "gptq: fp16 qweight": (_gptq, lambda s, e: e(gptq)(s[0].half(), *s[1:], D, GROUP), TypeError, "qweight"),
    "gptq: direction of length in": (_gptq, lambda s, e: e(gptq)(*s, torch.randn(IN), GROUP), ValueError, "direction"),
    "awq: GPTQ-shaped qweight": (
        _awq,
        lambda s, e: e(awq)(s[0].reshape(IN // 8, -1)[:, :OUT].contiguous(), *s[1:], D, GROUP),
        ValueError,
        "qweight|group_size|qzeros|scales",
    ),
    "awq: group size zero": (_awq, lambda s, e: e(awq)(*s, D, 0), ValueError, "group_size"),
    "fp8: scale of no granularity": (
        _fp8,
        lambda s, e: e(fp8)(s[0], torch.ones(2, 2), D),
        ValueError,
        "weight_scale",
    ),
    "fp8: bf16 weight": (_fp8, lambda s, e: e(fp8)(s[0].to(torch.bfloat16), s[1], D), TypeError, "weight"),
    "fp8: zero direction": (_fp8, lambda s, e: e(fp8)(*s, torch.zeros(OUT)), ValueError, "direction"),
    "nf4: absmax for another blocksize": (
        _nf4,
        lambda s, e: e(nf4)(s._replace(blocksize=32), D),
        ValueError,
        "absmax",
    ),
    "nf4: odd blocksize": (_nf4, lambda s, e: e(nf4)(s._replace(blocksize=63), D), ValueError, "blocksize"),
    "nf4: nested tensors missing": (
        _nf4,
        lambda s, e: e(nf4)(s._replace(nested_code=None), D),
        ValueError,
        "nested",
    ),
    "nf4: direction does not divide the values": (
        _nf4,
        lambda s, e: e(nf4)(s, torch.randn(OUT + 1)),
        ValueError,
        "direction",
    ),
    "nf4: plain absmax as uint8": (
        lambda: _nf4(False),
        lambda s, e: e(nf4)(s._replace(absmax=s.absmax.to(torch.uint8)), D),
        TypeError,
        "absmax",
    ),
}

ENTRIES = {
    "kernel": lambda module: module.orthogonalize_,
    "reference": lambda module: module.orthogonalize_reference_,
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_and_leaves_storage(case, entry):
    make, call, error, named = CASES[case]
    state = make()
    before = clone_state(state)
    with pytest.raises(error, match=named):
        call(state, ENTRIES[entry])
    for after, original in zip(tensors(state), tensors(before), strict=True):
        assert torch.equal(after.reshape(-1).view(torch.uint8), original.reshape(-1).view(torch.uint8))


def test_fake_kernels_check_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qweight, qzeros, scales = (
            torch.empty(s, dtype=t)
            for s, t in (((12, 40), torch.int32), ((3, 5), torch.int32), ((3, 40), torch.float16))
        )
        torch.ops.refusal.orthogonalize_gptq(qweight, qzeros, scales, None, torch.empty(40), GROUP)
        with pytest.raises(ValueError, match="group_size"):
            torch.ops.refusal.orthogonalize_gptq(qweight, qzeros, scales, None, torch.empty(40), 36)


@pytest.mark.parametrize(
    "op, args",
    [
        ("int8", lambda: (*_int8(), D)),
        ("gptq", lambda: (*_gptq(), D, GROUP)),
        ("gptq", lambda: (*_gptq(), D, GROUP, 1.0, "v2")),
        ("awq", lambda: (*_awq(), D, GROUP)),
        ("nf4", lambda: nf4.op_args(_nf4(), D, 1.0)),
        ("nf4", lambda: nf4.op_args(_nf4(double_quant=False), D, 0.5)),
    ],
    ids=["int8", "gptq", "gptq v2", "awq", "nf4 double-quant", "nf4"],
)
def test_opcheck(op, args):
    torch.library.opcheck(
        getattr(torch.ops.refusal, f"orthogonalize_{op}"),
        args(),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_opcheck_fp8():
    # opcheck's schema test compares the tensors before and after with ops that have no
    # float8_e4m3fn CPU kernel ("mul_cpu_reduced_float" not implemented): the fake-tensor test only.
    torch.library.opcheck(torch.ops.refusal.orthogonalize_fp8, (*_fp8(), D), test_utils=("test_faketensor",))
