"""orthogonalize_gguf: a GGUF file's residual writers edited in their own GGML types, the rest kept.

The files are small synthetic llama-shaped GGUFs (tests/gguf_files.py) whose writers are
stored in each type the edit supports; every architecture the edit claims is in
test_hf_gguf_architectures.py, each type's output run by llama.cpp in test_hf_gguf_types.py,
the real models in test_hf_gguf_models.py.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_files import D_MODEL, write
from test_hf_checkpoint import _resident_kib

from refusal_kernels import reference
from refusal_kernels.hf import StructureError, orthogonalize_gguf
from refusal_kernels.hf import gguf as hf_gguf
from refusal_kernels.quant import gguf as blocks
from refusal_kernels.quant.gguf import container
from refusal_kernels.quant.gguf.container import GGUFFormatError

TYPES = ["F32", "F16", "BF16", *blocks.FORMATS]
# RMS of (edited - fp32 edit of the original) over RMS of the original, per writer type:
# about the format's own requantization error (see tests/test_quant_gguf_*.py), with room.
RELATIVE_RMS_BOUND = {"F32": 1e-6, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.06}
DEFAULT_BOUND = 0.2


def _direction(seed: int = 1) -> torch.Tensor:
    return torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))


def _values(tensor) -> torch.Tensor:
    """A reader tensor's values, fp32 [rows, ne0]."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(-1, int(tensor.shape[0]))


def _expected(name: str, values: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    if name == "token_embd.weight":
        return reference.ablate(values, unit)
    return values - torch.outer(unit, unit @ values)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("type_name", TYPES)
def test_every_writer_is_edited_in_its_own_type_and_everything_else_is_kept(tmp_path, type_name):
    src = write(tmp_path / "src.gguf", writer_type=type_name)
    before = _sha(src)
    direction = _direction()
    # The plain edit (no feedback passes, which test_quant_gguf_feedback.py covers) is bounded by the format's rounding.
    edit = orthogonalize_gguf(src, tmp_path / "out.gguf", direction, layer=1, position=-1, feedback_passes=0)
    assert _sha(src) == before
    original, edited = gguf.GGUFReader(src), gguf.GGUFReader(edit.path)
    names = [t.name for t in original.tensors]
    assert [t.name for t in edited.tensors] == [*names, "output.weight"]
    assert edit.untied_head
    writers = {"token_embd.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_output", "ffn_down")}
    assert edit.changed == dict.fromkeys(sorted(writers, key=names.index), type_name)
    unit = direction / direction.norm()
    for old, new in zip(original.tensors, edited.tensors, strict=False):
        assert (new.tensor_type, list(new.shape)) == (old.tensor_type, list(old.shape)), old.name
        if old.name not in writers:
            assert np.array_equal(old.data, new.data), old.name
            continue
        expected = _expected(old.name, _values(old), unit)
        error = (_values(new) - expected).norm() / _values(old).norm()
        assert error < RELATIVE_RMS_BOUND.get(type_name, DEFAULT_BOUND), old.name
    head = edited.tensors[-1]
    assert head.tensor_type == original.tensors[0].tensor_type
    assert np.array_equal(head.data, original.tensors[0].data)  # the head keeps the original embedding
    assert edited.alignment == original.alignment and edited.data_offset % edited.alignment == 0


def test_metadata_is_kept_and_the_edit_is_recorded(tmp_path):
    src = write(tmp_path / "src.gguf")
    edit = orthogonalize_gguf(src, tmp_path / "out.gguf", _direction(), scale=0.5, layer=1, position=-2)
    original, edited = gguf.GGUFReader(src), gguf.GGUFReader(edit.path)
    pseudo = ("GGUF.tensor_count", "GGUF.kv_count", "GGUF.version")
    for key, field in original.fields.items():
        if key not in pseudo:
            assert edited.fields[key].contents() == field.contents(), key
    added = {k: f.contents() for k, f in edited.fields.items() if k.startswith("refusal_kernels.")}
    assert added["refusal_kernels.scale"] == 0.5
    assert (added["refusal_kernels.direction.layer"], added["refusal_kernels.direction.position"]) == (1, -2)
    assert added["refusal_kernels.method"] == "weight orthogonalization"
    assert "refusal_kernels.version" in added


def test_a_schedule_scales_each_writer_and_zero_leaves_it_byte_for_byte(tmp_path):
    src = write(tmp_path / "src.gguf", writer_type="F32")
    schedule = hf_gguf.Schedule(attention=(1.0, 0.0), mlp=(0.0, 0.5), embeddings=0.0)
    edit = orthogonalize_gguf(src, tmp_path / "out.gguf", _direction(), scale=schedule)
    assert set(edit.changed) == {"blk.0.attn_output.weight", "blk.1.ffn_down.weight"}
    assert not edit.untied_head
    edited = gguf.GGUFReader(edit.path)
    assert edited.fields["refusal_kernels.schedule.mlp"].contents() == [0.0, 0.5]
    unit = _direction() / _direction().norm()
    down = next(t for t in edited.tensors if t.name == "blk.1.ffn_down.weight")
    source = next(t for t in gguf.GGUFReader(src).tensors if t.name == "blk.1.ffn_down.weight")
    expected = _values(source) - 0.5 * torch.outer(unit, unit @ _values(source))
    torch.testing.assert_close(_values(down), expected, atol=1e-6, rtol=1e-5)


def test_a_writer_type_without_an_edit_is_a_type_error_unless_requantized(tmp_path):
    src = write(tmp_path / "src.gguf", writer_type="Q8_0")
    # The same file with blk.0.ffn_down as IQ4_NL blocks (fp16 d, then 16 bytes of 4-bit indices).
    source = container.read(src)
    iq4 = gguf.GGMLQuantizationType.IQ4_NL
    rows, cols = 256, 512
    raw = np.random.default_rng(0).integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
    raw[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    outputs = [
        container.OutputTensor(t.name, iq4, t.shape, make=lambda: raw.reshape(rows, -1))
        if t.name == "blk.0.ffn_down.weight"
        else container.OutputTensor(t.name, t.type, t.shape, source=t)
        for t in source.tensors
    ]
    odd = container.write(source, tmp_path / "iq4.gguf", outputs, {})
    with pytest.raises(TypeError, match=re.escape("tensor blk.0.ffn_down.weight is IQ4_NL")):
        orthogonalize_gguf(odd, tmp_path / "out.gguf", _direction())
    assert not (tmp_path / "out.gguf").exists()
    with pytest.warns(UserWarning, match="re-encoding blk.0.ffn_down.weight as Q8_0"):
        edit = orthogonalize_gguf(odd, tmp_path / "out.gguf", _direction(), requant="Q8_0")
    assert edit.changed["blk.0.ffn_down.weight"] == "Q8_0"
    down = next(t for t in gguf.GGUFReader(edit.path).tensors if t.name == "blk.0.ffn_down.weight")
    original = next(t for t in gguf.GGUFReader(odd).tensors if t.name == "blk.0.ffn_down.weight")
    unit = _direction() / _direction().norm()
    expected = _expected(down.name, _values(original), unit)
    assert (_values(down) - expected).norm() / expected.norm() < 0.01


def _corrupt(path, tmp_path, how: str):
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[:4] = b"GGUX"
    elif how == "truncated":
        data = data[: len(data) - 1000]
    else:  # an unknown type in the first tensor's info record
        info = gguf.GGUFReader(path).tensors[0].field
        type_offset = info.offset + sum(int(p.nbytes) for p in info.parts[:-2])
        data[type_offset : type_offset + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / f"{how}.gguf"
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("how", ["magic", "truncated", "type"])
def test_a_corrupt_file_is_a_one_line_format_error_and_nothing_is_written(tmp_path, how):
    bad = _corrupt(write(tmp_path / "src.gguf"), tmp_path, how)
    before = _sha(bad)
    with pytest.raises(GGUFFormatError, match=re.escape(str(bad))) as error:
        orthogonalize_gguf(bad, tmp_path / "out.gguf", _direction())
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out.gguf").exists() and _sha(bad) == before


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"direction": torch.randn(D_MODEL + 1)}, ValueError, "direction must have shape [256] (the file's embedding"),
        ({"direction": torch.zeros(D_MODEL)}, ValueError, "direction must be finite and non-zero"),
        ({"direction": torch.ones(D_MODEL, dtype=torch.int32)}, TypeError, "direction must have a floating-point"),
        ({"scale": float("nan")}, ValueError, "scale must be a finite number"),
        ({"layers": [5]}, ValueError, "layers holds [5], outside [0, 2)"),
        ({"requant": "Q9_9"}, ValueError, "requant must be one of"),
        ({"feedback_passes": -1}, ValueError, "feedback_passes must be a non-negative int"),
        ({"dst": "same"}, ValueError, "is the source file"),
        ({"dst": "missing/out.gguf"}, ValueError, "does not exist"),
    ],
)
def test_bad_arguments_raise_naming_the_argument_and_write_nothing(tmp_path, arguments, error, match):
    src = write(tmp_path / "src.gguf")
    before = _sha(src)
    arguments = {"direction": _direction(), **arguments}
    dst = {"same": src, None: tmp_path / "out.gguf"}.get(arguments.pop("dst", None))
    dst = dst or tmp_path / "missing" / "out.gguf"
    with pytest.raises(error, match=re.escape(match)):
        orthogonalize_gguf(src, dst, **arguments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"] and _sha(src) == before


# Not claimed: mamba (its writer is ssm_out), mistral3 (transformers cannot load its GGUF).
@pytest.mark.parametrize("arch", ["mamba", "mistral3"])
def test_an_architecture_whose_writers_are_not_known_in_gguf_terms_is_refused(tmp_path, arch):
    src = write(tmp_path / "src.gguf", arch=arch)
    with pytest.raises(StructureError, match=f"architecture '{arch}': its residual writers cannot be named"):
        orthogonalize_gguf(src, tmp_path / "out.gguf", _direction())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    src = write(tmp_path / "src.gguf")
    calls = []

    edit = hf_gguf.blocks.orthogonalize_

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return edit(*args, **kwargs)

    monkeypatch.setattr(hf_gguf.blocks, "orthogonalize_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        orthogonalize_gguf(src, tmp_path / "out.gguf", _direction())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


def test_peak_memory_is_about_one_tensor(tmp_path):
    """Peak RSS growth while editing a GGUF whose largest tensor (token_embd, F32) is 8 MiB."""
    src = write(tmp_path / "src.gguf", writer_type="F32", n_layers=16, vocab=8192)
    total = src.stat().st_size
    largest = 8192 * D_MODEL * 4
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM)
    except OSError:
        pytest.skip("cannot reset the peak resident set size on this system")
    baseline = _resident_kib("VmRSS")
    orthogonalize_gguf(src, tmp_path / "out.gguf", _direction())
    peak_growth = (_resident_kib("VmHWM") - baseline) * 1024
    print(
        f"GGUF {total / 2**20:.1f} MiB, largest tensor {largest / 2**20:.1f} MiB, peak growth {peak_growth / 2**20:.1f} MiB"
    )
    assert peak_growth < 2 * largest < total
