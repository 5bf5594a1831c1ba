"""Import a checkpoint written by plain ``torch.distributed.checkpoint.save`` (DCP's
``FileSystemWriter``) as a torchkeep step, without running code from it.

DCP's ``.metadata`` is a pickle that ``dcp.load`` unpickles unrestricted (pytorch #189308).
Here it is read by an unpickler that resolves only the globals a real ``.metadata`` names
(DCP's metadata dataclasses, ``torch.Size``, dtypes, layouts, paths) and refuses every other
global before anything is called. Each stored item is a ``torch.save`` record inside a
``.distcp`` file: it is cut out and read through torchkeep's scanned, weights-only loader.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, TypeGuard

import torch

from ...errors import CorruptFileError, UnsafeCheckpointError, first_line
from ...formats import torch_zip
from .layout import geometry_problem

_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
    "torch": {"Size", "strided", "contiguous_format", "channels_last", "preserve_format",
              *(str(d).removeprefix("torch.") for d in vars(torch).values()
                if isinstance(d, torch.dtype))},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}  # fmt: skip
_MAX_METADATA_BYTES = 256 << 20


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only :data:`_METADATA_GLOBALS`; anything else is refused before it is used."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"the DCP .metadata names {module}.{name}, which DCP metadata never holds; it was "
            "refused without being imported or called (the file may be hostile)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("the DCP .metadata uses persistent ids; refused")


def read_dcp_metadata(directory: Path) -> Any:
    """DCP's ``Metadata`` from ``directory/.metadata``, through the allowlisted unpickler.

    Raises:
        UnsafeCheckpointError: it names a global beyond DCP's metadata classes.
        CorruptFileError: it is not a readable DCP metadata pickle.
    """
    path = directory / ".metadata"
    try:
        if path.stat().st_size > _MAX_METADATA_BYTES:
            raise CorruptFileError(f"{path} is larger than {_MAX_METADATA_BYTES} bytes; refused")
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptFileError(
            f"{directory} has no .metadata: it is not a checkpoint written by dcp.save"
        ) from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # a damaged pickle raises many kinds
        raise CorruptFileError(
            f"{path} is not a readable DCP metadata file ({first_line(exc)})"
        ) from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CorruptFileError(f"{path} does not hold DCP Metadata")
    return metadata


def _int(value: object) -> TypeGuard[int]:
    return type(value) is int and value >= 0


def _checked_items(directory: Path, metadata: Any) -> dict[Any, tuple[Path, int, int]]:
    """Each stored item's file, offset and length, after proving the metadata describes only
    bytes that exist: every item a non-negative span inside a regular file of ``directory``
    (no link or ``..`` leading out), every tensor's chunks tiling it exactly once, each chunk
    backed by an item of at least its raw size, and no more item bytes than the files hold.
    So nothing is allocated beyond what is stored and no part of a tensor is left unfilled.

    Raises:
        UnsafeCheckpointError: an item lies outside the checkpoint.
        CorruptFileError: the metadata is inconsistent (names the item or tensor).
    """
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    home = directory.resolve()
    source = directory / ".metadata"
    spans: dict[Any, tuple[Path, int, int]] = {}
    sizes: dict[Path, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        name = str(getattr(info, "relative_path", ""))
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(index, MetadataIndex) and _int(offset) and _int(length)):
            raise CorruptFileError(f"{source}: item {index!r:.100} has no valid place")
        if getattr(info, "transform_descriptors", None):
            raise CorruptFileError(f"{directory}: items with stream transforms are not supported")
        path = directory / name
        try:
            inside = bool(name) and path.resolve().parent == home
            if inside and path not in sizes:
                sizes[path] = path.stat().st_size if path.is_file() else -1
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a link loop
            raise CorruptFileError(f"{source}: item {index.fqn!r} names no readable file") from exc
        if not inside:
            raise UnsafeCheckpointError(f"{directory}: an item points outside the checkpoint")
        if offset + length > sizes[path]:
            raise CorruptFileError(f"{source}: item {index.fqn!r} lies outside {path.name}")
        spans[index] = (path, offset, length)
    if sum(length for _, _, length in spans.values()) > sum(sizes.values()):
        raise CorruptFileError(f"{source}: its items claim more bytes than its files hold")
    for fqn, described in metadata.state_dict_metadata.items():
        if not isinstance(described, TensorStorageMetadata):
            if MetadataIndex(fqn) not in spans:
                raise CorruptFileError(f"{source}: value {fqn!r} has no stored item")
            continue
        itemsize = described.properties.dtype.itemsize
        boxes = [(list(c.offsets), list(c.sizes)) for c in described.chunks]
        problem = geometry_problem(list(described.size), boxes)
        if problem is not None:
            raise CorruptFileError(f"{source}: tensor {fqn!r} has {problem}")
        for offsets, chunk_sizes in boxes:
            span = spans.get(MetadataIndex(fqn, offsets))
            if span is None or span[2] < math.prod(chunk_sizes) * itemsize:
                raise CorruptFileError(
                    f"{source}: the chunk of {fqn!r} at {offsets} is not stored whole"
                )
    return spans


def _item(span: tuple[Path, int, int], scratch: Path) -> Any:
    """One stored item, read through the scanned weights-only loader."""
    source, offset, length = span
    with open(source, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    record = scratch / "item.pt"
    record.write_bytes(data)
    try:
        return torch_zip.load(record, map_location="cpu")
    finally:
        record.unlink()


def load_dcp(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Every value of a ``dcp.save`` checkpoint, nested as it was saved, without running code.

    Raises:
        UnsafeCheckpointError: ``.metadata`` or an item would run code.
        CorruptFileError: the checkpoint is damaged.
    """
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    directory = Path(directory)
    metadata = read_dcp_metadata(directory)
    spans = _checked_items(directory, metadata)
    flat: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tk-dcp-") as scratch:
        for fqn, described in metadata.state_dict_metadata.items():
            if not isinstance(described, TensorStorageMetadata):
                flat[fqn] = _item(spans[MetadataIndex(fqn)], Path(scratch))
                continue
            full = torch.empty(tuple(described.size), dtype=described.properties.dtype)
            for chunk_meta in described.chunks:
                index = MetadataIndex(fqn, chunk_meta.offsets)
                chunk = _item(spans[index], Path(scratch))
                if not (
                    isinstance(chunk, torch.Tensor)
                    and chunk.shape == chunk_meta.sizes
                    and chunk.dtype == full.dtype
                ):
                    raise CorruptFileError(
                        f"{directory}: the chunk of {fqn!r} at {list(chunk_meta.offsets)} does "
                        "not hold the tensor its metadata describes"
                    )
                box = full
                for dim, (offset, size) in enumerate(
                    zip(chunk_meta.offsets, chunk_meta.sizes, strict=True)
                ):
                    box = box.narrow(dim, int(offset), int(size))
                box.copy_(chunk)
            flat[fqn] = full
    return _unflatten(flat, metadata.planner_data)


def _unflatten(flat: dict[str, Any], mapping: Any) -> dict[str, Any]:
    """Nest DCP's flat keys again with the planner's key paths (``model.0.weight`` ->
    ``{"model": {"0.weight": ...}}``; list indices become lists again)."""
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

    if not isinstance(mapping, dict) or not mapping:
        return flat
    nested: dict[str, Any] = unflatten_state_dict(flat, mapping)
    return nested


def _restore_int_ids(optimizer: Any) -> None:
    """DCP writes an optimizer's integer parameter ids as strings (``state.0.exp_avg``); put
    them back as ints where the parameter groups list integer ids, as ``torch.optim`` does."""
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
        return
    groups = optimizer.get("param_groups")
    ids = {p for g in groups or [] if isinstance(g, dict) for p in g.get("params", [])}
    if ids and all(isinstance(p, int) for p in ids):
        optimizer["state"] = {
            int(k) if isinstance(k, str) and k.isdigit() and int(k) in ids else k: v
            for k, v in optimizer["state"].items()
        }


def import_dcp(
    dcp_dir: str | os.PathLike[str],
    ckpt_dir: str | os.PathLike[str],
    *,
    step: int = 0,
    overwrite: bool = False,
) -> Path:
    """Import a checkpoint written by ``torch.distributed.checkpoint.save`` as a step.

    ``.metadata`` is read through an allowlisted unpickler (DCP's metadata classes only) and
    each item through torchkeep's scanned weights-only loader, so a hostile checkpoint is
    refused without running anything. Top-level keys ``model``, ``optimizer``, ``scheduler``
    and ``scaler`` become stateful entries; other keys become plain values.

    Args:
        dcp_dir: the folder ``dcp.save`` wrote (``.metadata`` and ``*.distcp``).
        ckpt_dir: the torchkeep checkpoint folder to add the step to.
        step: the step number to save it as.
        overwrite: replace an existing step of that number.

    Returns:
        The new step directory.

    Raises:
        UnsafeCheckpointError: the checkpoint would run code; nothing was written.
        DistributedCheckpointError: torch is older than 2.6 (see ``torchkeep.compat``).

    Example:
        >>> import_dcp("dcp_ckpt", "ckpt", step=100)
    """
    from ...compat import require_sharded_checkpoints
    from ..manager import STATE_SLOTS, CheckpointManager

    require_sharded_checkpoints("tk.checkpoint.import_dcp")
    state = load_dcp(dcp_dir)
    _restore_int_ids(state.get("optimizer"))
    slots = {name: state.pop(name) for name in STATE_SLOTS if isinstance(state.get(name), dict)}
    manager = CheckpointManager(ckpt_dir, keep_last=None, save_rng=False, distributed=False)
    return manager._save_entries(step, slots, state, overwrite=overwrite)
