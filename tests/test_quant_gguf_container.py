"""container.read against the gguf package's own reader, and the header errors it names."""

import re

import gguf
import numpy as np
import pytest
from gguf_files import write

from refusal_kernels.quant.gguf import container
from refusal_kernels.quant.gguf.container import GGUFFormatError


def _with_every_value_type(path):
    """A small GGUF holding a value of every metadata type, arrays of strings and numbers included."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 7)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 65000)
    writer.add_int16("t.i16", -32000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.25)
    writer.add_uint64("t.u64", 2**63)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.unicode", "naïve ✓")
    writer.add_array("t.strings", ["a", "", "ŧoken", "\u0120the"])
    writer.add_array("t.floats", [0.5, -1.5, 3.0])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.empty", [])
    writer.add_tensor("odd", np.arange(35, dtype=np.float32).reshape(5, 7))
    writer.add_tensor("q8", np.zeros((3, 2 * 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _expected(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    records = {k: (int(f.offset), int(f.offset) + sum(int(p.nbytes) for p in f.parts)) for k, f in fields.items()}
    metadata = {k: (lambda v: v.tolist() if isinstance(v, np.ndarray) else v)(f.contents()) for k, f in fields.items()}
    tensors = [(t.name, t.tensor_type, tuple(int(n) for n in t.shape), int(t.data_offset)) for t in reader.tensors]
    return reader.alignment, metadata, records, tensors


@pytest.mark.parametrize("make", [_with_every_value_type, write])
def test_read_gives_what_the_gguf_package_reads(tmp_path, make):
    path = make(tmp_path / "file.gguf")
    alignment, metadata, records, tensors = _expected(path)
    read = container.read(path)
    assert read.alignment == alignment
    assert read.metadata == metadata
    assert read.records == records
    assert [(t.name, t.type, t.shape, t.offset) for t in read.tensors] == tensors


def _patched(path, offset: int, value: bytes):
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (4, (3 << 24).to_bytes(4, "little"), "a big-endian GGUF; only little-endian files are edited"),
        (4, (1).to_bytes(4, "little"), "GGUF version 1; versions 2 and 3 are read"),
        (16, (10**6).to_bytes(8, "little"), "not a GGUF file this reader can edit"),
    ],
)
def test_a_bad_header_is_a_one_line_format_error_naming_the_file(tmp_path, offset, value, message):
    path = _patched(_with_every_value_type(tmp_path / "file.gguf"), offset, value)
    with pytest.raises(GGUFFormatError, match=re.escape(f"{path}: {message}")) as error:
        container.read(path)
    assert "\n" not in str(error.value)
