"""Reading and writing ``.onnx`` files safely: external data kept inside the file's folder.

An ONNX file may keep its tensors in *external data* files named by a ``location`` string. A
hostile file can point that at ``../../etc/passwd`` or an absolute path; every torchkeep reader
goes through :func:`load_model`, which refuses such locations and names a missing data file
before any other library touches it. Writes are staged in a temporary sibling folder and moved
into place with renames, data files first and the ``.onnx`` last, so a reader never sees a
``.onnx`` whose data is not there yet.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, FileFormatError, TorchkeepFileNotFoundError
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


def data_file_name(path: Path) -> str:
    """The external data file name torchkeep uses for ``path``: ``model.onnx.data``."""
    return f"{path.name}.data"


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


def _location_inside(folder: Path, location: str, *, onnx_path: Path, tensor: str) -> Path:
    """Resolve an external data ``location`` against ``folder``; refuse anything outside it."""
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    escapes = (
        not location
        or posix.is_absolute()
        or windows.is_absolute()
        or bool(windows.drive)
        or ".." in posix.parts
        or ".." in windows.parts
    )
    target = (folder / location).resolve()
    if escapes or not target.is_relative_to(folder.resolve()):
        raise CorruptFileError(
            f"{onnx_path}: tensor {tensor!r} keeps its data at {location!r}, outside the "
            f"file's folder {folder}; torchkeep refuses to read files outside it. Re-save the "
            "model with its external data next to the .onnx file"
        )
    return target


def check_external_data(path: Path, model: onnx.ModelProto) -> list[Path]:
    """Check every external data reference of ``model`` (loaded from ``path``).

    Args:
        path: the ``.onnx`` file the model was read from.
        model: the model, read without its external data.

    Returns:
        The external data files it uses, sorted (empty when all tensors are inline).

    Raises:
        CorruptFileError: a location points outside the folder, or a file is too short.
        TorchkeepFileNotFoundError: a data file is missing.

    Example:
        >>> check_external_data(path, onnx.load(path, load_external_data=False))
    """
    import onnx

    folder = path.parent
    files: dict[Path, int] = {}
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = _location_inside(folder, location, onnx_path=path, tensor=tensor.name)
        if not target.is_file():
            raise TorchkeepFileNotFoundError(
                f"{path}: the external data file {location!r} (tensor {tensor.name!r}) is "
                f"missing from {folder}. An .onnx with external data needs its data file next "
                "to it: copy both files together"
            )
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        files[target] = max(files.get(target, 0), end)
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
        raise FileFormatError(f"{path} is not a readable ONNX file: {exc}") from exc
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
    """Write ``model`` to ``path`` (in a staging folder), its weights inline or in one data file."""
    import onnx

    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external_data,
        all_tensors_to_one_file=True,
        location=data_file_name(path),
        size_threshold=_INLINE_TENSOR_BYTES,
    )


def commit(staged: Path, final: Path, metadata: Mapping[str, str]) -> list[str]:
    """Move a staged, verified model to ``final`` with ``metadata`` added to its properties.

    Data files are renamed into place first; the ``.onnx`` goes last, through an atomic write.
    A data file of an earlier export at ``final`` that the new model does not use is removed.

    Returns:
        The names of the external data files now next to ``final``.
    """
    model = load_model(staged)
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    names = []
    for data in check_external_data(staged, model):
        relative = data.relative_to(staged.parent.resolve())
        fsync_file(data)
        os.replace(data, final.parent / relative)
        names.append(str(relative))
    if names:
        fsync_dir(final.parent)
    with atomic_file(final) as f:
        f.write(model.SerializeToString())
    stale = final.parent / data_file_name(final)
    if data_file_name(final) not in names and stale.is_file():
        stale.unlink()
    return names
