"""Write one checkpoint step with the commit protocol of the design.

Every file goes into a temporary sibling of ``step-<n>/``, hashed while it is written (tensor
files streamed as :mod:`torchkeep.storage.stream` does, cached as the ``cache`` policy says); then
``state.json``, then ``manifest.json`` (sizes and hashes of all files), then fsync and rename.
Readers see the step only once it is complete.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .._version import __version__
from ..errors import StepExistsError
from ..format_versions import CHECKPOINT
from ..formats import safetensors as st
from ..manifest import FileRecord, write_hashed, write_json, write_manifest, write_tensors
from ..storage.cache import CachePolicy, drop_cached, refill_after_save
from ..storage.local import staged_directory
from .entries import Entry
from .layout import KIND, STATE_NAME, parse_step


def state_document(step: int, entries: Sequence[Entry]) -> dict[str, Any]:
    """``state.json`` of a step: the skeleton and file of every entry (written unsorted)."""
    return {
        "format_version": CHECKPOINT.writes,
        "step": step,
        "entries": {
            entry.name: {"kind": entry.kind, "file": entry.file_name, "value": entry.skeleton}
            for entry in entries
        },
    }


def tensor_metadata(entry: Entry) -> dict[str, str]:
    """The safetensors ``__metadata__`` of an entry's tensor file."""
    metadata = {"format": "pt", "torchkeep.version": __version__}
    if entry.aliases:
        metadata[st.ALIASES_KEY] = json.dumps(entry.aliases, sort_keys=True)
    return metadata


def write_step(
    final: Path,
    step: int,
    entries: Sequence[Entry],
    *,
    overwrite: bool,
    manifest_fields: Mapping[str, Any],
    extra_files: Mapping[str, bytes] | None = None,
    cache: CachePolicy = "auto",
) -> None:
    """Write and commit ``entries`` as the step directory ``final``.

    Args:
        final: the step directory (``.../step-00000042``).
        step: the step number, recorded in ``state.json`` and the manifest.
        entries: the prepared entries; their tensors must not change until this returns.
        overwrite: replace an existing ``final`` (atomically: the old one goes only after).
        manifest_fields: extra manifest fields (metrics, retention settings).
        extra_files: plain files a framework reads by name from the step (Hugging Face's
            ``trainer_state.json``), by file name; hashed and listed like every other file.
        cache: the page-cache policy of the tensor files (:mod:`torchkeep.storage.cache`);
            with ``"auto"`` the step that was newest before this one is evicted from the page
            cache once this one is committed, so only the newest step stays cached.

    Raises:
        StepExistsError: without ``overwrite``, another writer committed ``final`` first (two
            processes saving the same step: exactly one wins); its step is left as it is.
        StorageFullError: the disk filled up; the temporary directory was removed.
    """
    try:
        _stage(
            final,
            step,
            entries,
            overwrite=overwrite,
            manifest_fields=manifest_fields,
            extra_files=extra_files or {},
            cache=cache,
        )
    except OSError as exc:
        if overwrite or exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
            raise
        raise StepExistsError(
            f"checkpoint step {step} was committed at {final} by another writer while this one "
            "was saving it; this save was discarded. Save under another step, or pass "
            "overwrite=True to replace it"
        ) from None
    if cache == "auto":
        evict_previous_step(final, step)
        refill_after_save(cache, sorted(final.glob("*.safetensors")))


def evict_previous_step(final: Path, step: int) -> None:
    """Drop from the page cache the tensor files of the newest step older than ``step``.

    Each save under ``"auto"`` evicts its predecessor, so at most the newest step stays cached
    however many steps are kept: steps are written often and read rarely, and the one a restore
    reads is the newest. Only a hint to the kernel; nothing on disk changes.
    """
    older = [
        (number, child)
        for child in final.parent.iterdir()
        if (number := parse_step(child.name)) is not None and number < step
    ]
    if older:
        drop_cached(max(older)[1].glob("*.safetensors"))


def _bytes_writer(data: bytes) -> Callable[[BinaryIO], None]:
    def write(f: BinaryIO) -> None:
        f.write(data)

    return write


def _stage(
    final: Path,
    step: int,
    entries: Sequence[Entry],
    *,
    overwrite: bool,
    manifest_fields: Mapping[str, Any],
    extra_files: Mapping[str, bytes],
    cache: CachePolicy,
) -> None:
    with staged_directory(final, overwrite=overwrite) as temp:
        files: dict[str, FileRecord] = {
            name: write_hashed(temp / name, _bytes_writer(data))
            for name, data in extra_files.items()
        }
        for entry in entries:
            if entry.file_name is not None:
                files[entry.file_name] = write_tensors(
                    temp / entry.file_name, entry.tensors, tensor_metadata(entry), cache=cache
                )
        state = state_document(step, entries)
        files[STATE_NAME] = write_json(temp / STATE_NAME, state, sort_keys=False)
        write_manifest(temp, kind=KIND, files=files, step=step, **manifest_fields)
