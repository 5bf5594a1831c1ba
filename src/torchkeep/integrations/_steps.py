"""A torchkeep step at a path a framework chooses (``last.ckpt``, ``checkpoint-500``).

The dict a framework hands over is stored with one entry per top-level key, each a JSON
skeleton plus its own safetensors file, committed with the checkpoint protocol (temporary
sibling, fsync, manifest with content hashes written last, atomic rename or exchange). Reading
verifies every byte against the manifest before anything is returned; nothing is unpickled.

A URL (``s3://bucket/run/last.ckpt``) is a step on object storage (:mod:`._location`): the
data goes under a fresh save id, the manifest is created exclusively last, and an existing
step is replaced by a conditional replace of its manifest (S3 ``If-Match``), so the old step
stays readable until the new one is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

from ..checkpoint import rng
from ..checkpoint.commit import write_step
from ..checkpoint.entries import prepare
from ..checkpoint.layout import MAX_STEP, RNG_ENTRY
from ..checkpoint.reader import read_step
from ..checkpoint.remote import RemoteSteps
from ..errors import StorageCapabilityError
from ..storage.local import remove_stale_temps, temp_sibling

Where: TypeAlias = Path | RemoteSteps
"""A step's place: a local directory, or a step on object storage (:func:`._location.locate`)."""


def step_number(value: object) -> int:
    """``value`` as a step number for the manifest; 0 when it cannot be one."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP:
        return value
    return 0


def save_values(
    where: Where,
    values: Mapping[str, Any],
    *,
    step: int,
    capture_rng: bool = True,
    extra_files: Mapping[str, bytes] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Commit ``values`` as the step at ``where``, replacing an older one atomically.

    Every value is validated (and the random generators captured) before the first byte is
    written; a refused value names its path (``hyper_parameters.cfg``).

    Args:
        where: the directory to write; an existing step there is replaced only once the new
            one is complete (an exchange on Linux; on object storage a conditional replace
            of the manifest).
        values: entries by name; objects with ``state_dict()`` are stored by their state.
        step: the step number recorded in the manifest.
        capture_rng: store the Python, NumPy and torch generator states as well.
        extra_files: plain files stored beside the entries, hashed and listed too (local
            paths only).
        metrics: numbers recorded in the manifest.

    Raises:
        UnsupportedValueError: a name or value cannot be stored without pickle.
        StorageFullError: the disk filled up (the previous step at ``path`` is intact).
        StorageCapabilityError: a back end without a conditional replace; ``extra_files``
            on object storage.
        StepExistsError: another writer replaced the step on the bucket while this one
            uploaded (this save's data is deleted).
        RemoteStorageError: the store failed for good; the previous step there is intact.
    """
    if not isinstance(where, Path) and extra_files:
        raise StorageCapabilityError(f"{where.step_url(0)}: extra files go in local steps only")
    states = rng.capture() if capture_rng else None  # first: as close to the call as can be
    entries = [prepare(str(name), value) for name, value in values.items()]
    if states is not None:
        entries.append(prepare(RNG_ENTRY, states, internal=True))
    metrics_field = {"metrics": dict(metrics or {})}
    if not isinstance(where, Path):
        where.commit(step, entries, overwrite=True, manifest_fields=metrics_field)
        where.clean_orphans(where.committed())  # a crashed save's data, once past the grace
        return
    final = where
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent)
    write_step(
        final,
        step,
        entries,
        overwrite=True,
        manifest_fields=metrics_field,
        extra_files=extra_files,
    )


def load_values(where: Where) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read and verify the step at ``where``.

    Returns:
        Every entry by name (tensors on the CPU, in memory of their own), and the generator
        states saved with it (checked to be restorable) or None.

    Raises:
        TorchkeepFileNotFoundError: ``path`` holds no committed step.
        CorruptFileError: a file is missing, truncated or fails its hash.
    """
    loaded = read_step(where) if isinstance(where, Path) else where.read(0)
    values = {name: loaded.value(name) for name in loaded.entries if name != RNG_ENTRY}
    states = loaded.value(RNG_ENTRY) if RNG_ENTRY in loaded.entries else None
    return values, states


def remove_step(where: Where) -> None:
    """Remove a step directory (or a plain file): renamed out of sight first, then deleted.
    On object storage: its manifest first (the step disappears at once), then its data."""
    if not isinstance(where, Path):
        where.retire_step(0)
        return
    target = where
    if target.is_symlink() or target.is_file():
        target.unlink()
        return
    if not target.is_dir():
        return
    hidden = temp_sibling(target)
    os.rename(target, hidden)
    shutil.rmtree(hidden, ignore_errors=True)
