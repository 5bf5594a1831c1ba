"""File formats torchkeep reads and writes, recognised by content rather than suffix."""

from __future__ import annotations

import enum
import os
import stat
import zipfile
from pathlib import Path

from ..errors import CorruptFileError, FileFormatError, UnreadableFileError
from ..paths import require_exists
from . import safetensors as st

# Every legacy (pre-zip) torch.save file starts with this magic number, pickled with protocol 2.
LEGACY_TORCH_PREFIX = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class Format(str, enum.Enum):
    """What a path holds."""

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    PICKLE = "pickle"
    TORCHSCRIPT = "torchscript"
    PT2 = "pt2"
    ONNX = "onnx"
    CHECKPOINT_STEP = "checkpoint-step"
    CHECKPOINT_DIR = "checkpoint-dir"
    BUNDLE = "bundle"
    UNKNOWN = "unknown"


def _zip_kind(path: Path) -> Format:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise CorruptFileError(
            f"{path} starts like a zip archive (torch.save, torch.export) but cannot be opened "
            f"({exc}); it is truncated or damaged, re-create it from its source"
        ) from None
    # torch >= 2.5 writes an archive_format entry; torch 2.4 only serialized_exported_program.json
    if any(n.endswith(("archive_format", "serialized_exported_program.json")) for n in names):
        return Format.PT2
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        return Format.TORCHSCRIPT
    if any(n.endswith("data.pkl") for n in names):
        return Format.TORCH_ZIP
    return Format.UNKNOWN


# Kinds recorded in the "format" field of a manifest.json, and what each directory is.
_MANIFEST_KINDS = {
    "torchkeep.bundle": Format.BUNDLE,
    "torchkeep.checkpoint": Format.CHECKPOINT_STEP,
}


def _directory_kind(path: Path) -> Format:
    """What a directory is: the kind its manifest declares (parsed by the bounded reader, never
    substring-matched), else a checkpoint folder if it holds step folders."""
    from ..manifest import declared_format

    kind = _MANIFEST_KINDS.get(declared_format(path) or "")
    if kind is not None:
        return kind
    try:
        if any(child.name.startswith("step-") for child in path.iterdir()):
            return Format.CHECKPOINT_DIR
    except OSError as exc:
        raise UnreadableFileError(
            f"{path} cannot be listed ({exc.strerror or exc}); check its permissions"
        ) from None
    return Format.UNKNOWN


def detect_format(path: str | os.PathLike[str]) -> Format:
    """Recognise what ``path`` holds by reading its first bytes (or its manifest)."""
    path = Path(path)
    mode = require_exists(path).st_mode
    if stat.S_ISDIR(mode):
        return _directory_kind(path)
    if not stat.S_ISREG(mode):
        # Reading a FIFO or a device could block forever or never end.
        raise FileFormatError(f"{path} is not a regular file (a pipe, socket or device?)")
    try:
        with open(path, "rb") as f:
            prefix = f.read(16)
    except OSError as exc:
        raise UnreadableFileError(
            f"{path} cannot be read ({exc.strerror or exc}); check its permissions and the disk"
        ) from None
    if st.is_safetensors(prefix):
        return Format.SAFETENSORS
    if prefix.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if prefix.startswith(LEGACY_TORCH_PREFIX):
        return Format.TORCH_LEGACY
    if prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return Format.PICKLE
    if path.suffix == ".onnx":
        return Format.ONNX
    return Format.UNKNOWN


def require_file(path: Path) -> None:
    """Raise the typed error for a missing path, a directory or an empty file."""
    info = require_exists(path)
    if stat.S_ISDIR(info.st_mode):
        raise FileFormatError(f"{path} is a directory, not a weights file")
    if info.st_size == 0:
        raise FileFormatError(f"{path} is empty (0 bytes): an interrupted write? Re-create it")
