"""The GGUF file itself: read and check its layout, and write an edited copy, tensor by tensor.

A GGUF file is a header (magic, version, tensor and key counts), the metadata key-value
records, one info record per tensor (name, dimensions in ggml order, type, offset), padding
to the alignment, then the tensors' data, each at an aligned offset from the data's start.

`read` parses the header, metadata and tensor infos itself, from a memory map, and checks the
magic, version, byte order, every value type and tensor type, each tensor's size against its
type and shape, and that it ends inside the file. Any problem is a `GGUFFormatError` (a
ValueError) of one line naming the file. (The `gguf` package's reader builds a numpy view per
field part, which on a tokenizer of 150k strings takes longer than the whole edit.)

`write` writes a new file from the source's metadata records (copied byte for byte, except
the keys it replaces), plus new keys, and a list of tensors whose bytes come from the source
or from a function called when that tensor is written, so that one tensor at a time is in
memory. It writes to a temporary file beside the target and renames it at the end: an error
or Ctrl-C leaves no partial file, and the source is only read.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# Copies of source bytes move this many at a time.
COPY_CHUNK_BYTES = 1 << 24
_WRITTEN_VERSION = 3


class GGUFFormatError(ValueError):
    """A file that is not a GGUF this reader can edit: bad magic, a tensor past the end, an unknown type."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: name, ggml type, shape in ggml order (ne0, the row length,
    first), its data's absolute offset in the file and its size in bytes."""

    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))


@dataclass(frozen=True)
class GGUFFile:
    """A checked GGUF file: its path, alignment, metadata (decoded values), the byte range of
    each metadata record, and its tensors in header order."""

    path: Path
    alignment: int
    metadata: dict[str, Any]
    records: dict[str, tuple[int, int]]
    tensors: tuple[TensorInfo, ...]

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)

    @property
    def matrix_types(self) -> set[str]:
        """The GGML type names its matrices (tensors of two or more dims) are stored in."""
        return {t.type.name for t in self.tensors if len(t.shape) > 1}

    def read_bytes(self, tensor: TensorInfo) -> np.ndarray:
        """A copy of the tensor's bytes, uint8 [rows, bytes_per_row]."""
        with open(self.path, "rb") as f:
            f.seek(tensor.offset)
            data = np.fromfile(f, dtype=np.uint8, count=tensor.nbytes)
        if data.size != tensor.nbytes:
            raise GGUFFormatError(f"{self.path}: tensor {tensor.name} ends past the end of the file")
        return data.reshape(tensor.rows, -1)


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write: name, type and ggml shape, and either the source tensor whose bytes it
    copies or a function returning its bytes (called once, when it is written)."""

    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    source: TensorInfo | None = None
    make: Callable[[], np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.type, self.shape)


def tensor_nbytes(type_: gguf.GGMLQuantizationType, shape: Sequence[int]) -> int:
    """The bytes of a tensor of this type and ggml shape; GGUFFormatError if ne0 is not a whole number of blocks."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[type_]
    if shape[0] % block_values:
        raise GGUFFormatError(f"a {type_.name} row holds blocks of {block_values} values, got a row of {shape[0]}")
    return int(np.prod(shape, dtype=np.int64)) // block_values * block_bytes


# GGUF value types -> struct format of one value (STRING and ARRAY are read apart).
_VALUE_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}
_DEFAULT_ALIGNMENT = 32


class _Cursor:
    """Reads little-endian GGUF values from a buffer, front to back."""

    def __init__(self, data) -> None:
        self.data, self.at = data, 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.at + length > len(self.data):
            raise ValueError("a string runs past the end of the file")
        text = self.data[self.at : self.at + length].decode("utf-8", errors="surrogateescape")
        self.at += length
        return text

    def value(self, kind: int) -> Any:
        kind = gguf.GGUFValueType(kind)
        if kind == gguf.GGUFValueType.STRING:
            return self.string()
        if kind != gguf.GGUFValueType.ARRAY:
            return self.unpack(_VALUE_FORMATS[kind])
        item, count = gguf.GGUFValueType(self.unpack("<I")), self.unpack("<Q")
        if item in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
            return [self.value(item) for _ in range(count)]
        dtype = np.dtype(_VALUE_FORMATS[item])
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.at)
        self.at += count * dtype.itemsize
        return values.tolist()


def _check_header(path: Path, cursor: _Cursor) -> tuple[int, int]:
    """The tensor and key counts, after the magic and version."""
    if cursor.unpack("<I") != gguf.GGUF_MAGIC:
        raise GGUFFormatError(f"{path}: not a GGUF file (bad magic)")
    version = cursor.unpack("<I")
    if version and not version & 0xFFFF:  # another byte order reads its small version as a multiple of 2^16
        raise GGUFFormatError(f"{path}: a big-endian GGUF; only little-endian files are edited")
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: GGUF version {version}; versions 2 and 3 are read")
    return cursor.unpack("<Q"), cursor.unpack("<Q")


def _tensor_infos(path: Path, cursor: _Cursor, count: int, alignment: int) -> list[TensorInfo]:
    raw = []
    for _ in range(count):
        name = cursor.string()
        shape = tuple(cursor.unpack("<Q") for _ in range(cursor.unpack("<I")))
        type_, offset = gguf.GGMLQuantizationType(cursor.unpack("<I")), cursor.unpack("<Q")
        raw.append((name, type_, shape, offset))
    data_start = cursor.at + (-cursor.at % alignment)
    size = len(cursor.data)
    tensors = []
    for name, type_, shape, offset in raw:
        info = TensorInfo(name, type_, shape, data_start + offset, tensor_nbytes(type_, shape))
        if info.offset + info.nbytes > size:
            raise GGUFFormatError(f"{path}: tensor {name} ends past the end of the file (truncated?)")
        tensors.append(info)
    return tensors


def _parse(path: Path, data) -> GGUFFile:
    cursor = _Cursor(data)
    tensor_count, key_count = _check_header(path, cursor)
    metadata, records = {}, {}
    for _ in range(key_count):
        start = cursor.at
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
        records[key] = (start, cursor.at)
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    if alignment <= 0:
        raise GGUFFormatError(f"{path}: general.alignment is {alignment}")
    tensors = _tensor_infos(path, cursor, tensor_count, alignment)
    return GGUFFile(path, alignment, metadata, records, tuple(tensors))


def read(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and check a GGUF file; GGUFFormatError (one line, naming the file) if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise GGUFFormatError(f"{path}: no such GGUF file")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(path, data)
    except (ValueError, IndexError, KeyError, struct.error, OSError) as error:
        if isinstance(error, GGUFFormatError):
            raise
        raise GGUFFormatError(f"{path}: not a GGUF file this reader can edit: {error}") from None


# ---- writing


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


_SCALARS = {
    bool: (gguf.GGUFValueType.BOOL, "<?"),
    int: (gguf.GGUFValueType.INT64, "<q"),
    float: (gguf.GGUFValueType.FLOAT32, "<f"),
}


def _value(value: Any) -> bytes:
    """A metadata value's type and bytes: str, bool, int (INT64), float (FLOAT32), or a list of one of these."""
    if isinstance(value, str):
        return struct.pack("<I", gguf.GGUFValueType.STRING) + _string(value)
    if isinstance(value, (list, tuple)):
        kinds = {type(v) for v in value}
        if len(kinds) > 1 or kinds == {str}:
            raise TypeError(f"a metadata array holds numbers of one kind, got {sorted(k.__name__ for k in kinds)}")
        kind, fmt = _SCALARS[kinds.pop() if kinds else float]
        body = b"".join(struct.pack(fmt, v) for v in value)
        return struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, kind, len(value)) + body
    if type(value) not in _SCALARS:
        raise TypeError(f"metadata values are str, bool, int, float or lists of numbers, got {type(value).__name__}")
    kind, fmt = _SCALARS[type(value)]
    return struct.pack("<I", kind) + struct.pack(fmt, value)


def _padding(offset: int, alignment: int) -> bytes:
    return b"\0" * (-offset % alignment)


def _header(source: GGUFFile, tensors: Sequence[OutputTensor], added: dict[str, Any]) -> bytes:
    """Header, metadata and tensor infos, padded to the alignment."""
    kept = [key for key in source.records if key not in added]
    parts = [struct.pack("<IIQQ", gguf.GGUF_MAGIC, _WRITTEN_VERSION, len(tensors), len(kept) + len(added))]
    with open(source.path, "rb") as f:
        for key in kept:
            start, end = source.records[key]
            f.seek(start)
            parts.append(f.read(end - start))
    parts.extend(_string(key) + _value(value) for key, value in added.items())
    offset = 0
    for tensor in tensors:
        dims = struct.pack(f"<I{len(tensor.shape)}Q", len(tensor.shape), *tensor.shape)
        parts.append(_string(tensor.name) + dims + struct.pack("<IQ", tensor.type, offset))
        offset += tensor.nbytes + len(_padding(tensor.nbytes, source.alignment))
    header = b"".join(parts)
    return header + _padding(len(header), source.alignment)


def _source_chunks(source: GGUFFile, tensor: TensorInfo) -> Iterator[bytes]:
    with open(source.path, "rb") as f:
        f.seek(tensor.offset)
        left = tensor.nbytes
        while left:
            chunk = f.read(min(left, COPY_CHUNK_BYTES))
            if not chunk:
                raise GGUFFormatError(f"{source.path}: tensor {tensor.name} ends past the end of the file")
            left -= len(chunk)
            yield chunk


def _write_data(out, source: GGUFFile, tensor: OutputTensor) -> None:
    if tensor.make is None:
        for chunk in _source_chunks(source, tensor.source):
            out.write(chunk)
    else:
        data = np.ascontiguousarray(tensor.make(), dtype=np.uint8)
        if data.nbytes != tensor.nbytes:
            raise ValueError(f"tensor {tensor.name}: {data.nbytes} bytes made, its type and shape need {tensor.nbytes}")
        out.write(memoryview(data).cast("B"))
    out.write(_padding(tensor.nbytes, source.alignment))


def write(
    source: GGUFFile, target: str | os.PathLike[str], tensors: Sequence[OutputTensor], added: dict[str, Any]
) -> Path:
    """Write a GGUF file at `target`: the source's metadata records and `added` keys (which replace
    any of the same name), then `tensors` in order, at aligned offsets. Atomic (see the module docstring)."""
    target = Path(target)
    header = _header(source, tensors, added)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(header)
            for tensor in tensors:
                _write_data(out, source, tensor)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
