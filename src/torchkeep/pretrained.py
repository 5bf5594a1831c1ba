"""Weights written by other tools' ``save_pretrained``: a folder, one file or sharded by an index.

A Hugging Face style folder holds ``model.safetensors`` or ``pytorch_model.bin``, or shards
listed by ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``
(``{"metadata": {...}, "weight_map": {tensor name: shard file}}``). An index may be hostile:
it is read by the bounded JSON reader and checked against a schema; every shard must be a
plain file name of a regular file inside the index's folder (no ``..``, no absolute path, no
link leading out); and the map must agree with the shards' own contents (every key held by
the shard it names, no key in two shards, nothing unmapped) before any tensor is read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CorruptFileError, FileFormatError, UnreadableFileError, UnsafeCheckpointError
from .formats import Format, detect_format
from .schema import Limits, Map, Object, Str, load_json_document
from .weights import StoredTensors, open_source

# What a save_pretrained folder may hold, in the order transformers prefers them.
FOLDER_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
INDEX_SUFFIX = ".index.json"
INDEX_LIMITS = Limits(max_bytes=32 << 20, max_depth=8)
MAX_SHARDS = 10_000
SHARD_FORMATS = (Format.SAFETENSORS, Format.TORCH_ZIP)
# A shard is named by a plain file name: no separator, no NUL, not hidden, not "." or "..".
_SHARD_NAME = r"(?!\.)[^/\\\x00]{1,255}"
INDEX_SCHEMA = Object(
    {
        "metadata": Map(max_len=1024),
        "weight_map": Map(value=Str(max_len=255, pattern=_SHARD_NAME), key=Str(max_len=1024)),
    },
    required=("weight_map",),
)
_FIX = "re-create the index with save_pretrained, or load the shards one by one"


def is_index(path: Path) -> bool:
    """True when ``path`` is named like a shard index (``*.index.json``)."""
    return path.name.endswith(INDEX_SUFFIX)


def folder_file(folder: Path) -> Path | None:
    """The weights file (or index) of a ``save_pretrained`` folder, or None if it has none."""
    for name in FOLDER_FILES:
        candidate = folder / name
        if _entry_kind(candidate) is not None:
            return _inside(folder, candidate)
    return None


def _entry_kind(path: Path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnreadableFileError(f"{path} cannot be read ({exc.strerror or exc})") from None


def _inside(folder: Path, path: Path) -> Path:
    """``path`` if it is a regular file whose real location lies inside ``folder``."""
    mode = _entry_kind(path)
    if mode is None:
        raise FileFormatError(f"{path} does not exist; {_FIX}")
    if stat.S_ISLNK(mode):
        real, home = path.resolve(), folder.resolve()
        if not real.is_relative_to(home):
            raise UnsafeCheckpointError(
                f"{path} is a link to {real}, outside {folder}; a shard must lie inside the "
                "folder of its index. Copy the file into the folder (or load it by its own path)"
            )
    elif not stat.S_ISREG(mode):
        raise FileFormatError(f"{path} is not a regular file; {_FIX}")
    return path


@dataclass
class ShardedTensors(StoredTensors):
    """Stored tensors spread over shards: each key is read from the shard that holds it."""

    shards: dict[str, StoredTensors] = field(default_factory=dict)

    def load(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every tensor of every shard, by name."""
        tensors: dict[str, torch.Tensor] = {}
        parts = {id(part): part for part in self.shards.values()}
        for part in parts.values():
            tensors.update(part.load(device))
        return tensors

    def read_into(self, targets: Mapping[str, torch.Tensor]) -> None:
        """Copy each named tensor from its shard into ``targets``' memory."""
        by_part: dict[int, tuple[StoredTensors, dict[str, torch.Tensor]]] = {}
        for name, target in targets.items():
            part = self.shards[name]
            by_part.setdefault(id(part), (part, {}))[1][name] = target
        for part, chunk in by_part.values():
            part.read_into(chunk)


def _shard_files(index: Path, weight_map: Mapping[str, str]) -> dict[str, Path]:
    names = sorted(set(weight_map.values()))
    if len(names) > MAX_SHARDS:
        raise CorruptFileError(f"{index} names {len(names)} shards (limit {MAX_SHARDS}); {_FIX}")
    return {name: _inside(index.parent, index.parent / name) for name in names}


def _check_consistent(
    index: Path, weight_map: Mapping[str, str], parts: Mapping[str, StoredTensors]
) -> None:
    """Raise :class:`CorruptFileError` unless each shard holds exactly the keys mapped to it."""
    holder: dict[str, str] = {}
    for name, part in parts.items():
        for key in part.shapes:
            if key in holder:
                raise CorruptFileError(
                    f"{index}: tensor {key!r} is held by two shards, {holder[key]} and {name}; "
                    f"which one is meant cannot be told. {_FIX}"
                )
            holder[key] = name
    for key, name in weight_map.items():
        if holder.get(key) != name:
            where = f"it is in {holder[key]}" if key in holder else "no shard holds it"
            raise CorruptFileError(
                f"{index}: the weight map puts tensor {key!r} in {name}, but {where}; {_FIX}"
            )
    unmapped = sorted(set(holder) - set(weight_map))
    if unmapped:
        raise CorruptFileError(
            f"{index}: shard {holder[unmapped[0]]} holds tensor {unmapped[0]!r}, which the "
            f"weight map does not list ({len(unmapped)} such tensors); {_FIX}"
        )


def open_index(index: Path, device: torch.device) -> ShardedTensors:
    """Check a shard index and its shards; nothing but headers (and scanned ``torch.save``
    shards) is read before every check passed.

    Raises:
        InvalidDocumentError: the index breaks its bounds or schema (names the key).
        UnsafeCheckpointError: a shard is a link leading out of the index's folder.
        CorruptFileError: a shard is missing, or the map disagrees with the shards' contents
            (names the shard and the tensor).
    """
    document = load_json_document(index, schema=INDEX_SCHEMA, limits=INDEX_LIMITS, fix=_FIX)
    weight_map: dict[str, str] = document["weight_map"]
    files = _shard_files(index, weight_map)
    for name, path in files.items():
        # Checked before opening: a shard that is itself an index (or this one) must not be
        # followed.
        kind = detect_format(path)
        if kind not in SHARD_FORMATS:
            raise CorruptFileError(
                f"{index}: shard {name} is {kind.value}, not safetensors or a torch.save file; "
                f"{_FIX}"
            )
    parts = {name: open_source(path, device) for name, path in files.items()}
    _check_consistent(index, weight_map, parts)
    shapes = {key: parts[name].shapes[key] for key, name in weight_map.items()}
    formats = {part.format for part in parts.values()}
    fmt = formats.pop() if len(formats) == 1 else Format.UNKNOWN
    return ShardedTensors(
        index, fmt, shapes, shards={key: parts[name] for key, name in weight_map.items()}
    )


def open_pretrained(path: Path, device: torch.device) -> StoredTensors | None:
    """A ``save_pretrained`` folder or a shard index as stored tensors, or None for neither."""
    if is_index(path) and not path.is_dir():
        return open_index(path, device)
    if not path.is_dir():
        return None
    found = folder_file(path)
    if found is None:
        return None
    if is_index(found):
        return open_index(found, device)
    return open_source(found, device)
