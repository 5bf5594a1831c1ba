"""File formats torchkeep reads and writes, recognised by content rather than suffix."""

from __future__ import annotations

import enum
import os
import zipfile
from pathlib import Path

from ..errors import CorruptFileError, FileFormatError, TorchkeepFileNotFoundError
from . import safetensors as st
from .jsondoc import read_json_document

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
    if any(n.endswith("archive_format") for n in names):
        return Format.PT2
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        return Format.TORCHSCRIPT
    if any(n.endswith("data.pkl") for n in names):
        return Format.TORCH_ZIP
    return Format.UNKNOWN


# Kinds recorded in the "format" field of a manifest.json, and what each directory is.
_MANIFEST_KINDS = {"torchkeep.bundle": "bundle", "torchkeep.checkpoint": "checkpoint-step"}
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_MANIFEST_DEPTH = 32


def _manifest_kind(manifest: Path) -> Format:
    """The kind a manifest declares in its ``format`` field (parsed, never substring-matched);
    UNKNOWN for a manifest that cannot be parsed or declares nothing torchkeep writes."""
    try:
        document = read_json_document(
            manifest,
            max_bytes=MAX_MANIFEST_BYTES,
            max_depth=MAX_MANIFEST_DEPTH,
            what="a torchkeep manifest",
        )
    except (CorruptFileError, TorchkeepFileNotFoundError):
        return Format.UNKNOWN
    kind = document.get("format") if isinstance(document, dict) else None
    return (
        Format(_MANIFEST_KINDS[kind])
        if isinstance(kind, str) and kind in _MANIFEST_KINDS
        else Format.UNKNOWN
    )


def _directory_kind(path: Path) -> Format:
    from ..manifest import MANIFEST_NAME

    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        kind = _manifest_kind(manifest)
        if kind != Format.UNKNOWN:
            return kind
    if any(child.name.startswith("step-") for child in path.iterdir()):
        return Format.CHECKPOINT_DIR
    return Format.UNKNOWN


def detect_format(path: str | os.PathLike[str]) -> Format:
    """Recognise what ``path`` holds by reading its first bytes (or its manifest)."""
    path = Path(path)
    if not path.exists():
        raise TorchkeepFileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        return _directory_kind(path)
    if not path.is_file():
        # Reading a FIFO or a device could block forever or never end.
        raise FileFormatError(f"{path} is not a regular file (a pipe, socket or device?)")
    with open(path, "rb") as f:
        prefix = f.read(16)
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
    if not path.exists():
        raise TorchkeepFileNotFoundError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory, not a weights file")
    if path.stat().st_size == 0:
        raise FileFormatError(f"{path} is empty (0 bytes): an interrupted write? Re-create it")
