"""What a file or directory holds, without loading its tensors: the data behind ``inspect``.

Each format has one describer, registered in :data:`DESCRIBERS`; modules for other formats
(bundles, programs, ONNX) add theirs there.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import FileFormatError, UnsafeCheckpointError
from .formats import Format, detect_format, require_file, torch_zip
from .formats import safetensors as st
from .paths import require_exists
from .remote_files import StorageOptions, fetched, remote_or_none

if TYPE_CHECKING:
    from .storage.transfer import Transfer


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype, shape and byte size of one stored tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Description:
    """Everything ``inspect`` shows about a path.

    Attributes:
        path: what was described.
        format: the format recognised from the content.
        size: bytes on disk (all files, for a directory).
        tensors: the stored tensors, tied aliases excluded.
        metadata: string metadata stored with the tensors.
        tied: stored name -> the other names that share its storage.
        sections: further titled key/value tables a format contributes (inputs, reports, ...).
        notes: free-form remarks (deprecations, warnings).
    """

    path: Path | str
    format: Format
    size: int
    tensors: list[TensorInfo] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    tied: dict[str, list[str]] = field(default_factory=dict)
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def parameter_count(self) -> int:
        """Number of elements over all stored tensors (each tied tensor counted once)."""
        return sum(t.numel for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the description."""
        return {
            "path": str(self.path),
            "format": self.format.value,
            "size": self.size,
            "parameter_count": self.parameter_count,
            "tensor_bytes": self.tensor_bytes,
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                for t in self.tensors
            ],
            "metadata": self.metadata,
            "tied": self.tied,
            "sections": {title: dict(rows) for title, rows in self.sections.items()},
            "notes": self.notes,
        }


def _describe_safetensors(path: Path) -> Description:
    header = st.read_header(path)
    description = Description(path, Format.SAFETENSORS, header.file_size)
    description.metadata = dict(header.metadata)
    description.tensors = [
        TensorInfo(e.name, st.NAME_OF_DTYPE[e.dtype], e.shape, e.nbytes)
        for e in header.entries.values()
    ]
    for alias, target in header.aliases.items():
        description.tied.setdefault(target, []).append(alias)
    return description


def _tensor_info(name: str, tensor: torch.Tensor) -> TensorInfo:
    dtype = st.NAME_OF_DTYPE.get(tensor.dtype, str(tensor.dtype).removeprefix("torch."))
    return TensorInfo(name, dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size())


def _flatten_tensors(value: object, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten_tensors(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _flatten_tensors(item, f"{prefix}.{index}" if prefix else str(index), out)


def _describe_pickled_model(path: Path, fmt: Format) -> Description:
    """A ``torch.save(model)`` file: what it would import, from a static scan (never loaded)."""
    from .security import scan

    report = scan(path)
    if report.dangerous:
        raise UnsafeCheckpointError(
            f"{path} contains pickled code that could run on loading; run `torchkeep scan "
            f"{path}` for the list and do not load this file"
        )
    description = Description(path, fmt, path.stat().st_size)
    description.sections["pickled classes"] = [
        (finding.name, finding.severity.value)
        for finding in report.findings
        if finding.kind == "global" and finding.severity.value != "safe"
    ]
    description.notes.append(
        "a pickled whole model (torch.save(model)): its tensors are known only by unpickling "
        "it. Load it with tk.load_pickled_model(path, allow=...) or migrate it with "
        "`torchkeep convert PATH BUNDLE --allow PREFIX`"
    )
    return description


def shorten(text: str, limit: int = 200) -> str:
    """``text``, cut to ``limit`` characters with ``...`` (a value such as a pickled RNG state
    would otherwise fill a screen)."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _describe_torch(path: Path) -> Description:
    fmt = detect_format(path)
    try:
        content = torch_zip.load(path, map_location="cpu")  # memory-mapped: reads no tensor data
    except UnsafeCheckpointError:
        return _describe_pickled_model(path, fmt)
    description = Description(path, fmt, path.stat().st_size)
    tensors: dict[str, torch.Tensor] = {}
    _flatten_tensors(content, "", tensors)
    seen: dict[tuple[object, ...], str] = {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            description.tied.setdefault(seen[key], []).append(name)
            continue
        seen[key] = name
        description.tensors.append(_tensor_info(name, tensor))
    if isinstance(content, dict):
        others = {k: v for k, v in content.items() if not isinstance(v, (dict, torch.Tensor))}
        if others:
            description.sections["values"] = [(str(k), shorten(repr(v))) for k, v in others.items()]
    return description


DESCRIBERS: dict[Format, Callable[[Path], Description]] = {
    Format.SAFETENSORS: _describe_safetensors,
    Format.TORCH_ZIP: _describe_torch,
    Format.TORCH_LEGACY: _describe_torch,
    Format.PICKLE: _describe_torch,  # read weights-only: a hostile pickle is refused
}


def describe(
    path: str | os.PathLike[str],
    *,
    storage_options: StorageOptions | None = None,
    transfer: Transfer | None = None,
) -> Description:
    """Describe what ``path`` holds (format, tensors, metadata, ...) without loading tensor data.

    A URL is fetched first into a private temporary folder (a folder: its manifest and the
    files it lists) and described by the same code; the description names the URL.

    Args:
        path: a weights file, checkpoint, bundle, program or ONNX file, or its URL.
        storage_options: for a URL, options of its fsspec filesystem.
        transfer: for a URL, a :class:`Transfer` (parallel reads, retries, deadline).

    Returns:
        A :class:`Description`.

    Example:
        >>> describe("net.safetensors").parameter_count
    """
    remote = remote_or_none(path, storage_options, transfer)
    if remote is not None:
        with fetched(remote) as local:
            description = _describe(local)
        here = str(local)
        description.path = remote.url
        description.notes = [note.replace(here, remote.url) for note in description.notes]
        return description
    return _describe(Path(path))


def _describe(path: Path) -> Description:
    """:func:`describe` of a local path."""
    if stat.S_ISREG(require_exists(path).st_mode):
        require_file(path)  # an empty file gets its own message
    fmt = detect_format(path)
    describer = DESCRIBERS.get(fmt)
    if describer is None:
        raise FileFormatError(
            f"{path}: torchkeep cannot describe this content (recognised as {fmt.value})"
        )
    return describer(path)
