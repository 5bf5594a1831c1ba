"""Reading and writing ``.onnx`` files safely: external data kept inside the file's folder.

An ONNX file may keep its tensors in *external data* files named by a ``location`` string. A
hostile file can point that at ``../../etc/passwd`` or an absolute path; every torchkeep reader
goes through :func:`load_model`, which refuses such locations and names a missing data file
before any other library touches it. Writes are staged in a temporary sibling folder. The
weights of each export get a file name of their own, ``model.onnx.<16 hex digits of their
hash>.data``, moved into place before the ``.onnx`` is atomically replaced, and the data files
of the previous export are deleted only after that: a crash at any point leaves the old or the
new model loadable (plus, at worst, an unused data file the next export removes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, TorchkeepError, TorchkeepFileNotFoundError, first_line
from ..hashing import hash_file
from ..storage.local import atomic_file, fsync_dir, fsync_file, temp_sibling
from ._deps import require
from .graph import all_graphs

if TYPE_CHECKING:
    import onnx

EXTERNAL_DATA_THRESHOLD = 1536 * 1024**2
"""Initializer bytes above which weights go to an external data file (protobuf stops at 2 GiB,
and the graph itself needs room too)."""

# Tensors smaller than this stay inline even when a model is saved with external data.
_INLINE_TENSOR_BYTES = 1024


_DIGEST_CHARS = 16


def data_file_name(path: Path, digest: str) -> str:
    """The external data file name for ``path`` and weights of hash ``digest``.

    Example:
        >>> data_file_name(Path("model.onnx"), "3f9a0c1d2e4b5a6978c0ffee12345678")
        'model.onnx.3f9a0c1d2e4b5a69.data'
    """
    return f"{path.name}.{digest[:_DIGEST_CHARS]}.data"


def is_data_file_name(path: Path, name: str) -> bool:
    """True when ``name`` has the form :func:`data_file_name` gives ``path``'s weights."""
    own = re.escape(path.name) + rf"\.[0-9a-f]{{{_DIGEST_CHARS}}}\.data"
    return re.fullmatch(own, name) is not None


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for graph in all_graphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors


_EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})
_NUMBER = re.compile(r"[0-9]{1,19}")
_MAX_OFFSET = 2**63 - 1  # int64: what onnx and onnxruntime store offsets in
_MAX_LOCATION_CHARS = 4096


@dataclass(frozen=True)
class ExternalData:
    """Where one tensor's external bytes are: a file inside the model's folder and a span."""

    tensor: str
    location: str
    target: Path
    offset: int
    length: int | None


def _refuse(onnx_path: Path, tensor: str, field: str, problem: str) -> CorruptFileError:
    return CorruptFileError(
        f"{onnx_path}: tensor {tensor!r}, external data field {field!r}: {problem}. The file "
        "is damaged or hostile; re-export it (torchkeep refuses to guess which bytes it meant)"
    )


def _number(onnx_path: Path, tensor: str, field: str, text: str) -> int:
    """A decimal offset or length in ``[0, 2**63)``; anything else is refused."""
    if not _NUMBER.fullmatch(text) or int(text) > _MAX_OFFSET:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise _refuse(onnx_path, tensor, field, f"{shown!r} is not a byte count in [0, 2**63)")
    return int(text)


def _location_inside(folder: Path, location: str, *, onnx_path: Path, tensor: str) -> Path:
    """Resolve an external data ``location`` against ``folder``; refuse anything outside it."""
    shown = location[:80] + ("..." if len(location) > 80 else "")
    if len(location) > _MAX_LOCATION_CHARS:
        raise _refuse(onnx_path, tensor, "location", f"longer than {_MAX_LOCATION_CHARS} chars")
    if not location.isprintable():
        raise _refuse(
            onnx_path, tensor, "location", f"{shown!r} has control characters (a NUL cuts it short)"
        )
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    escapes = (
        not location
        or posix.is_absolute()
        or windows.is_absolute()
        or bool(windows.drive)
        or ".." in posix.parts
        or ".." in windows.parts
    )
    try:
        target = (folder / location).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise _refuse(
            onnx_path, tensor, "location", f"{shown!r} cannot be resolved: {exc}"
        ) from exc
    if escapes or not target.is_relative_to(folder.resolve()):
        raise CorruptFileError(
            f"{onnx_path}: tensor {tensor!r} keeps its data at {location!r}, outside the "
            f"file's folder {folder}; torchkeep refuses to read files outside it. Re-save the "
            "model with its external data next to the .onnx file"
        )
    return target


def _external_data(path: Path, tensor: onnx.TensorProto) -> ExternalData:
    """Validate one tensor's ``external_data`` entries: known keys, each once, sane values."""
    info: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in _EXTERNAL_KEYS:
            raise _refuse(path, tensor.name, entry.key[:80], "not a key ONNX defines")
        if entry.key in info:
            raise _refuse(path, tensor.name, entry.key, "given twice; readers disagree on which")
        info[entry.key] = entry.value
    location = info.get("location", "")
    target = _location_inside(path.parent, location, onnx_path=path, tensor=tensor.name)
    offset = _number(path, tensor.name, "offset", info.get("offset", "0"))
    length = info.get("length")
    return ExternalData(
        tensor.name,
        location,
        target,
        offset,
        None if length is None else _number(path, tensor.name, "length", length),
    )


def _is_file(target: Path, *, onnx_path: Path, entry: ExternalData) -> bool:
    try:
        return target.is_file()
    except OSError as exc:  # a name too long for the file system, ...
        raise _refuse(onnx_path, entry.tensor, "location", f"cannot be read: {exc}") from exc


def check_external_data(path: Path, model: onnx.ModelProto) -> list[Path]:
    """Check every external data reference of ``model`` (loaded from ``path``).

    Every entry is validated before any file is looked at: only the keys ONNX defines, each
    once; a location without control characters that stays inside the file's folder (symlinks
    resolved); offsets and lengths that are decimal numbers in ``[0, 2**63)``.

    Args:
        path: the ``.onnx`` file the model was read from.
        model: the model, read without its external data.

    Returns:
        The external data files it uses, sorted (empty when all tensors are inline).

    Raises:
        CorruptFileError: an entry is malformed, a location points outside the folder, or a
            file is too short.
        TorchkeepFileNotFoundError: a data file is missing.

    Example:
        >>> check_external_data(path, onnx.load(path, load_external_data=False))
    """
    import onnx

    files: dict[Path, int] = {}
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = _external_data(path, tensor)
        if not _is_file(entry.target, onnx_path=path, entry=entry):
            raise TorchkeepFileNotFoundError(
                f"{path}: the external data file {entry.location!r} (tensor {entry.tensor!r}) "
                f"is missing from {path.parent}. An .onnx with external data needs its data "
                "file next to it: copy both files together"
            )
        end = entry.offset + (entry.length or 0)
        files[entry.target] = max(files.get(entry.target, 0), end)
    for target, end in files.items():
        if target.stat().st_size < end:
            raise CorruptFileError(
                f"{path}: the external data file {target.name} holds {target.stat().st_size} "
                f"bytes but the model reads up to byte {end}: it is truncated. Copy it again"
            )
    return sorted(files)


def load_model(path: Path, *, with_data: bool = False) -> onnx.ModelProto:
    """Read an ``.onnx`` file after checking its external data references.

    Args:
        path: the ``.onnx`` file.
        with_data: also read the external tensor data into the model.

    Returns:
        The model (external tensors left as references unless ``with_data``).

    Example:
        >>> load_model(Path("net.onnx")).opset_import
    """
    require("onnx", feature="reading an ONNX file")
    import onnx

    if not path.is_file():
        raise TorchkeepFileNotFoundError(f"{path} does not exist or is not a file")
    try:
        model: onnx.ModelProto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's errors share no useful base
        raise CorruptFileError(
            f"{path} is not a readable ONNX file ({first_line(exc)}): it is truncated, damaged "
            "or not ONNX. Export it again"
        ) from exc
    for field, present in (
        ("ir_version", model.ir_version > 0),
        ("graph", model.HasField("graph")),
    ):
        if not present:  # protobuf parses most short byte strings: these make it a model
            raise CorruptFileError(
                f"{path}: field {field!r} is missing (or stored with the wrong protobuf type): "
                "not an ONNX model, or a damaged one. Export it again"
            )
    check_external_data(path, model)
    if with_data:
        onnx.load_external_data_for_model(model, str(path.parent))
    return model


@contextlib.contextmanager
def staging_folder(final: Path) -> Iterator[Path]:
    """A temporary folder next to ``final`` to build its files in; always removed afterwards."""
    folder = temp_sibling(final)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_staged(model: onnx.ModelProto, path: Path, *, external_data: bool) -> None:
    """Write ``model`` to ``path`` (in a staging folder), its weights inline or in one data file.

    The data file is ``<name>.data`` while staged; :func:`commit` gives it its final name.
    """
    import onnx

    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external_data,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=_INLINE_TENSOR_BYTES,
    )


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` so exports into it commit one at a time.

    Best effort: where the folder cannot be opened or locked (some network file systems), the
    block runs unlocked.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _relocate(model: onnx.ModelProto, folder: Path, names: Mapping[Path, str]) -> None:
    """Point every external ``location`` of ``model`` (read from ``folder``) at its new name."""
    import onnx

    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = names[(folder / entry.value).resolve()]


def _used_names(final: Path) -> set[str]:
    """Names of the data files in ``final``'s folder that the model now at ``final`` uses.

    Read with :func:`load_model`, so only validated locations count; an unreadable or missing
    model uses none.
    """
    try:
        used = check_external_data(final, load_model(final))
    except (TorchkeepError, OSError):
        return set()
    folder = final.parent.resolve()
    return {p.name for p in used if p.parent == folder}


def _remove_unused(final: Path, keep: set[str], previous: set[str]) -> None:
    """Delete data files of earlier exports to ``final`` that the model there no longer uses.

    A file goes only when it is a plain file (not a link), not in ``keep``, and either has
    torchkeep's name for ``final``'s data (an earlier export's, or one a crash left unused) or
    was used by the model ``final`` replaced (``previous``) under the name ``<name>.data`` that
    ``torch.onnx.export`` and earlier torchkeep versions write. Nothing else is touched.
    """
    legacy = f"{final.name}.data"
    with os.scandir(final.parent) as entries:
        for entry in entries:
            name = entry.name
            ours = is_data_file_name(final, name) or (name == legacy and name in previous)
            if ours and name not in keep and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):  # the new model is committed: at worst, a
                    os.unlink(entry.path)  # leftover the next export removes


def commit(staged: Path, final: Path, metadata: Mapping[str, str]) -> list[str]:
    """Move a staged, verified model to ``final`` with ``metadata`` added to its properties.

    Each data file is named after its contents (:func:`data_file_name`), fsynced and renamed
    into ``final``'s folder first; then the ``.onnx`` replaces ``final`` atomically; only then
    are the data files the previous model there used deleted. A crash at any point leaves the
    old or the new model complete. Exports into one folder commit one at a time (a folder lock).

    Returns:
        The names of the external data files now next to ``final``.
    """
    model = load_model(staged)
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    names = {
        data: data_file_name(final, hash_file(data)[1])
        for data in check_external_data(staged, model)
    }
    _relocate(model, staged.parent, names)
    with _folder_lock(final.parent):
        # What the old model uses matters only for the legacy name: torchkeep's own names are
        # recognised by their form, so the old model (maybe a large inline one) is read only
        # when a legacy-named file is there to decide about.
        legacy = final.parent / f"{final.name}.data"
        previous = _used_names(final) if legacy.is_file() else set()
        for data, name in names.items():
            fsync_file(data)
            os.replace(data, final.parent / name)
        if names:
            fsync_dir(final.parent)
        with atomic_file(final) as f:
            f.write(model.SerializeToString())
        _remove_unused(final, set(names.values()), previous)
    return sorted(names.values())
