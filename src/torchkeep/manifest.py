"""Manifests: the commit marker of checkpoint steps and model bundles.

``manifest.json`` is written last. It records the format, versions, creation time and, for every
file of the directory, its size and content hash. A directory without a valid manifest does not
exist for any reader, and one whose files disagree with their manifest is corrupt.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ._version import __version__
from .errors import CorruptFileError, TorchkeepFileNotFoundError, UnreadableFileError
from .format_versions import BUNDLE, CHECKPOINT, SEALED, FormatKind, check_version
from .formats import safetensors as st
from .hashing import HASH_ALGORITHM, Hasher, hash_file, new_hasher
from .schema import Int, Limits, Map, Number, Object, Schema, Str, load_json_document
from .storage.cache import CachePolicy

MANIFEST_NAME = "manifest.json"
# The format versions of each manifest kind (see torchkeep.format_versions).
VERSIONED_KINDS: dict[str, FormatKind] = {
    "torchkeep.checkpoint": CHECKPOINT,
    "torchkeep.bundle": BUNDLE,
    "torchkeep.sealed": SEALED,
}


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
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    cache: CachePolicy = "auto",
) -> FileRecord:
    """Write a safetensors file at ``path``, hashing the bytes as they are written; ``cache``
    is the page-cache policy (:mod:`torchkeep.storage.cache`)."""
    hasher = new_hasher()
    with open(path, "xb", buffering=0) as f:
        size = st.write_file(f, tensors, metadata=metadata, hasher=hasher, cache=cache)
    return FileRecord(size, hasher.hexdigest())


def write_json(path: Path, value: object, *, sort_keys: bool = True) -> FileRecord:
    """Write ``value`` as indented JSON at ``path`` and return its record.

    ``sort_keys=False`` keeps the dicts' own order (needed where order is data).
    """
    data = json_bytes(value, sort_keys=sort_keys)
    return write_hashed(path, lambda f: _ignore(f.write(data)))


def json_bytes(value: object, *, sort_keys: bool = True) -> bytes:
    """``value`` encoded as torchkeep writes JSON documents (indented, a final newline)."""
    return (json.dumps(value, indent=2, sort_keys=sort_keys, allow_nan=True) + "\n").encode()


def _ignore(_: object) -> None:
    """Discard a return value (a write count) where a callback must return None."""


def write_manifest(
    directory: Path,
    *,
    kind: str,
    files: Mapping[str, FileRecord],
    format_version: int | None = None,
    **fields: Any,
) -> None:
    """Write ``manifest.json`` into ``directory`` (the caller commits the directory after).

    ``format_version`` defaults to the version this torchkeep writes for ``kind``; a writer of
    a newer layout passes its own (it must be one :mod:`torchkeep.format_versions` lists).
    """
    manifest = manifest_document(
        kind=kind,
        files=files,
        format_version=format_version,
        source=directory / MANIFEST_NAME,
        **fields,
    )
    write_json(directory / MANIFEST_NAME, manifest)


def manifest_document(
    *,
    kind: str,
    files: Mapping[str, FileRecord],
    format_version: int | None = None,
    source: Path | str = MANIFEST_NAME,
    **fields: Any,
) -> dict[str, Any]:
    """The manifest :func:`write_manifest` writes, as a dict (object stores upload it)."""
    versions = VERSIONED_KINDS[kind]
    version = versions.writes if format_version is None else format_version
    check_version(versions, version, source=source)
    return {
        "format": kind,
        "format_version": version,
        "created": time.time(),
        "torchkeep_version": __version__,
        "torch_version": torch.__version__,
        "hash_algorithm": HASH_ALGORITHM,
        "files": {name: record.to_json() for name, record in sorted(files.items())},
        **fields,
    }


# A file listed in a manifest: a plain name inside the directory (no separator, not hidden).
FILE_NAME_PATTERN = r"[^/\\\x00.][^/\\\x00]{0,254}"
DATA_PREFIX_PATTERN = "[0-9a-f]{16}"


def is_save_id(name: str) -> bool:
    """Whether ``name`` has the form of an object-storage save id (a step's data prefix)."""
    return re.fullmatch(DATA_PREFIX_PATTERN, name) is not None


MANIFEST_LIMITS = Limits(max_bytes=16 << 20, max_depth=32, allow_nonfinite=True)
_FILE_RECORD = Object(
    {"size": Int(), "hash": Str(max_len=128, pattern="[0-9a-f]+")}, required=("size", "hash")
)
_COMMON_FIELDS: dict[str, Schema] = {
    "format": Str(max_len=64),
    "format_version": Int(min=1, max=1000),
    "created": Number(min=0.0, max=1e11),
    "torchkeep_version": Str(max_len=64),
    "torch_version": Str(max_len=64),
    "hash_algorithm": Str(max_len=64),
    "files": Map(_FILE_RECORD, key=Str(max_len=255, pattern=FILE_NAME_PATTERN), max_len=10_000),
    # on object storage: the per-save id prefix (next to the manifest) holding the files
    "data": Str(max_len=32, pattern=DATA_PREFIX_PATTERN),
}
_COMMON_REQUIRED = ("format", "format_version", "created", "hash_algorithm", "files")


def read_manifest(
    directory: Path,
    *,
    kind: str | None = None,
    fields: Mapping[str, Schema] | None = None,
    required: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Read ``directory``'s manifest and check it against the manifest schema.

    The parse is bounded (size, depth, integer length) and every common field is checked
    (types, ranges, file names, finite creation time) before the manifest is returned; file
    contents are not hashed here (:func:`find_problems` does).

    Args:
        directory: the committed directory.
        kind: the ``format`` the manifest must declare (``"torchkeep.checkpoint"``).
        fields: schemas of the fields this kind adds (checked when present).
        required: which of those fields must be present.

    Raises:
        TorchkeepFileNotFoundError: there is no manifest (the directory was never committed).
        CorruptFileError: the manifest cannot be read, is invalid
            (:class:`~torchkeep.errors.InvalidDocumentError`) or describes another kind.
        FormatVersionError: a newer torchkeep wrote it (a format version this one does not
            read).
    """
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise TorchkeepFileNotFoundError(
            f"{directory} has no {MANIFEST_NAME}: it was never committed (an interrupted save) "
            "or is not a torchkeep directory"
        )
    schema = Object(
        {**_COMMON_FIELDS, **(fields or {})}, required=_COMMON_REQUIRED + tuple(required)
    )
    manifest: dict[str, Any] = load_json_document(path, schema=schema, limits=MANIFEST_LIMITS)
    if kind is not None and manifest["format"] != kind:
        raise CorruptFileError(
            f"{path} describes a {manifest['format'][:64]!r}, not a {kind!r}; "
            "point at the right directory"
        )
    versions = VERSIONED_KINDS.get(manifest["format"])
    if versions is None:
        raise CorruptFileError(
            f"{path} declares the format {manifest['format'][:64]!r}, which is not a torchkeep "
            "checkpoint step, bundle or sealed folder; point at the right directory"
        )
    check_version(versions, manifest["format_version"], source=path)
    if manifest["hash_algorithm"] != HASH_ALGORITHM:
        raise CorruptFileError(
            f"{path} uses hash {manifest['hash_algorithm']!r}; this torchkeep knows only "
            f"{HASH_ALGORITHM!r}. Upgrade torchkeep to read it"
        )
    return manifest


_DECLARATION = Object({"format": Str(max_len=64)}, required=("format",))


def declared_format(directory: Path) -> str | None:
    """The ``format`` ``directory``'s manifest declares, read through the same bounded reader
    and limits as :func:`read_manifest` but checking only that field (format detection must
    still recognise a bundle or step whose manifest is damaged elsewhere, so its readers can
    name the damage); None when there is no readable manifest declaring one."""
    try:
        manifest = load_json_document(
            directory / MANIFEST_NAME, schema=_DECLARATION, limits=MANIFEST_LIMITS
        )
    except (TorchkeepFileNotFoundError, CorruptFileError):
        return None
    declared: str = manifest["format"]
    return declared


def files_folder(directory: Path, manifest: Mapping[str, Any]) -> Path:
    """The folder holding the files ``directory``'s manifest lists: ``directory`` itself, or
    its sub-folder ``manifest["data"]`` when the manifest names one (a step or bundle written
    on object storage, where the files live under a per-save id, then copied to disk with
    ``aws s3 sync``, ``gsutil rsync`` or ``fsspec get``).

    The schema allows only 16 hex digits as ``data``, so the folder is always a direct child of
    ``directory``; it must be a real folder, not a symbolic link (a link could point anywhere,
    and retention would delete only the link), just as a step directory's own entries are
    looked up inside it.

    Raises:
        CorruptFileError: the data folder is missing, a symbolic link or not a folder.
    """
    data = manifest.get("data")
    if data is None:
        return directory
    folder = directory / str(data)
    where = f"{directory / MANIFEST_NAME} keeps its files in the sub-folder {data!r}"
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        raise CorruptFileError(
            f"{where}, which is missing: the copy of {directory} is incomplete. Copy the whole "
            "folder again (aws s3 sync, gsutil rsync -r, fsspec get(recursive=True))"
        ) from None
    except OSError as exc:
        raise UnreadableFileError(f"{folder} cannot be looked up ({exc.strerror or exc})") from None
    if stat.S_ISLNK(info.st_mode):
        raise CorruptFileError(
            f"{where}, but {folder} is a symbolic link; torchkeep reads a directory's files only "
            "from a real folder inside it. Replace the link by a copy of the folder it names"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise CorruptFileError(
            f"{where}, but {folder} is not a folder; the copy of {directory} is damaged. "
            "Copy the whole folder again"
        )
    return folder


def file_problem(
    folder: Path, name: str, record: Mapping[str, Any] | None, *, check_hash: bool
) -> str | None:
    """What is wrong with file ``name`` of ``folder`` (the directory's :func:`files_folder`)
    given its manifest record (None: the manifest does not list it), or None when the file is
    intact."""
    path = folder / name
    if record is None:
        return f"{path} is not listed in its directory's {MANIFEST_NAME}"
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as exc:
        return f"{path} cannot be looked up ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file (a folder, pipe or device stands in its place)"
    try:
        size = info.st_size
        if size != record["size"]:
            return (
                f"{path} has {size} bytes, the manifest says {record['size']} "
                "(truncated or replaced)"
            )
        if check_hash and hash_file(path)[1] != record["hash"]:
            return f"{path} does not match its {HASH_ALGORITHM} hash (corrupted)"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    return None


def find_problems(
    directory: Path,
    *,
    check_hashes: bool = True,
    kind: str | None = None,
    fields: Mapping[str, Schema] | None = None,
    required: tuple[str, ...] = (),
) -> list[str]:
    """List everything wrong with a committed directory; an empty list means it is intact.

    ``kind``, ``fields`` and ``required`` are passed to :func:`read_manifest`.
    """
    try:
        manifest = read_manifest(directory, kind=kind, fields=fields, required=required)
        folder = files_folder(directory, manifest)
    except (TorchkeepFileNotFoundError, CorruptFileError) as exc:
        return [str(exc)]
    problems = (
        file_problem(folder, name, record, check_hash=check_hashes)
        for name, record in manifest["files"].items()
    )
    return [problem for problem in problems if problem is not None]
