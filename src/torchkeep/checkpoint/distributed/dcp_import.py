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
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from ...errors import CorruptFileError, UnsafeCheckpointError, first_line
from ...formats import torch_zip

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


def _item(directory: Path, info: Any, scratch: Path) -> Any:
    """One stored item, read through the scanned weights-only loader."""
    if getattr(info, "transform_descriptors", None):
        raise CorruptFileError(f"{directory}: items with stream transforms are not supported")
    source = directory / str(info.relative_path)
    if source.resolve().parent != directory.resolve():
        raise UnsafeCheckpointError(f"{directory}: an item points outside the checkpoint")
    with open(source, "rb") as f:
        f.seek(int(info.offset))
        data = f.read(int(info.length))
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
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    metadata = read_dcp_metadata(directory)
    storage = metadata.storage_data or {}
    by_fqn: dict[str, list[Any]] = {}
    for index, info in storage.items():
        by_fqn.setdefault(index.fqn, []).append((index, info))
    flat: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tk-dcp-") as scratch:
        for fqn, described in metadata.state_dict_metadata.items():
            if isinstance(described, TensorStorageMetadata):
                full = torch.empty(tuple(described.size), dtype=described.properties.dtype)
                for index, info in by_fqn.get(fqn, []):
                    chunk = _item(directory, info, Path(scratch))
                    box = full
                    for dim, offset in enumerate(index.offset or ()):
                        box = box.narrow(dim, int(offset), chunk.shape[dim])
                    box.copy_(chunk)
                flat[fqn] = full
            else:
                (_, info), *_ = by_fqn[fqn]
                flat[fqn] = _item(directory, info, Path(scratch))
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

    Example:
        >>> import_dcp("dcp_ckpt", "ckpt", step=100)
    """
    from ..manager import STATE_SLOTS, CheckpointManager

    state = load_dcp(dcp_dir)
    _restore_int_ids(state.get("optimizer"))
    slots = {name: state.pop(name) for name in STATE_SLOTS if isinstance(state.get(name), dict)}
    manager = CheckpointManager(ckpt_dir, keep_last=None, save_rng=False, distributed=False)
    return manager._save_entries(step, slots, state, overwrite=overwrite)
