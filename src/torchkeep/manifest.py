"""Manifests: the commit marker of checkpoint steps and model bundles.

``manifest.json`` is written last. It records the format, versions, creation time and, for every
file of the directory, its size and content hash. A directory without a valid manifest does not
exist for any reader, and one whose files disagree with their manifest is corrupt.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ._version import __version__
from .errors import CorruptFileError, TorchkeepFileNotFoundError
from .formats import safetensors as st
from .hashing import HASH_ALGORITHM, Hasher, hash_file, new_hasher

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileRecord:
    """Size and content hash of one file in a committed directory."""

    size: int
    digest: str

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "hash": self.digest}


class _HashingFile:
    """Counts and hashes everything written through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hasher: Hasher = new_hasher()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.hasher.update(data)
        self.size += len(data)
        self._f.write(data)


def write_hashed(path: Path, write: Callable[[BinaryIO], None]) -> FileRecord:
    """Create ``path`` with ``write(f)`` (plain file writes) and return its size and hash."""
    with open(path, "xb") as f:
        hashing = _HashingFile(f)
        write(hashing)  # type: ignore[arg-type]
    return FileRecord(hashing.size, hashing.hasher.hexdigest())


def write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> FileRecord:
    """Write a safetensors file at ``path``, hashing the bytes as they are written."""
    hasher = new_hasher()
    with open(path, "xb", buffering=0) as f:
        size = st.write_file(f, tensors, metadata=metadata, hasher=hasher)
    return FileRecord(size, hasher.hexdigest())


def write_json(path: Path, value: object, *, sort_keys: bool = True) -> FileRecord:
    """Write ``value`` as indented JSON at ``path`` and return its record.

    ``sort_keys=False`` keeps the dicts' own order (needed where order is data).
    """
    data = (json.dumps(value, indent=2, sort_keys=sort_keys, allow_nan=True) + "\n").encode()
    return write_hashed(path, lambda f: _ignore(f.write(data)))


def _ignore(_: object) -> None:
    """Discard a return value (a write count) where a callback must return None."""


def write_manifest(
    directory: Path, *, kind: str, files: Mapping[str, FileRecord], **fields: Any
) -> None:
    """Write ``manifest.json`` into ``directory`` (the caller commits the directory after)."""
    manifest = {
        "format": kind,
        "format_version": FORMAT_VERSION,
        "created": time.time(),
        "torchkeep_version": __version__,
        "torch_version": torch.__version__,
        "hash_algorithm": HASH_ALGORITHM,
        "files": {name: record.to_json() for name, record in sorted(files.items())},
        **fields,
    }
    write_json(directory / MANIFEST_NAME, manifest)


def read_manifest(directory: Path, *, kind: str | None = None) -> dict[str, Any]:
    """Read and check the shape of ``directory``'s manifest (contents are not hashed here)."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise TorchkeepFileNotFoundError(
            f"{directory} has no {MANIFEST_NAME}: it was never committed (an interrupted save) "
            "or is not a torchkeep directory"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(
            f"{path} is not valid JSON ({exc}); the directory is corrupt"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptFileError(f"{path} lacks a 'files' table; the directory is corrupt")
    if kind is not None and manifest.get("format") != kind:
        raise CorruptFileError(
            f"{path} describes a {manifest.get('format')!r}, not a {kind!r}; "
            "point at the right directory"
        )
    if manifest.get("hash_algorithm") != HASH_ALGORITHM:
        raise CorruptFileError(
            f"{path} uses hash {manifest.get('hash_algorithm')!r}; this torchkeep knows only "
            f"{HASH_ALGORITHM!r}. Upgrade torchkeep to read it"
        )
    return manifest


def find_problems(directory: Path, *, check_hashes: bool = True) -> list[str]:
    """List everything wrong with a committed directory; an empty list means it is intact."""
    try:
        manifest = read_manifest(directory)
    except (TorchkeepFileNotFoundError, CorruptFileError) as exc:
        return [str(exc)]
    problems = []
    for name, record in manifest["files"].items():
        path = directory / name
        if os.sep in name or name.startswith(".") or not isinstance(record, dict):
            problems.append(f"{directory / MANIFEST_NAME} lists an invalid entry {name!r}")
        elif not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != record.get("size"):
            problems.append(
                f"{path} has {path.stat().st_size} bytes, the manifest says {record.get('size')}"
                " (truncated or replaced)"
            )
        elif check_hashes and hash_file(path)[1] != record.get("hash"):
            problems.append(f"{path} does not match its {HASH_ALGORITHM} hash (corrupted)")
    return problems
