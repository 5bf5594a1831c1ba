"""A torchkeep step at a path a framework chooses (``last.ckpt``, ``checkpoint-500``).

The dict a framework hands over is stored with one entry per top-level key, each a JSON
skeleton plus its own safetensors file, committed with the checkpoint protocol (temporary
sibling, fsync, manifest with content hashes written last, atomic rename or exchange). Reading
verifies every byte against the manifest before anything is returned; nothing is unpickled.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import rng
from ..checkpoint.commit import write_step
from ..checkpoint.entries import prepare
from ..checkpoint.layout import MAX_STEP, RNG_ENTRY
from ..checkpoint.reader import read_step
from ..storage.local import remove_stale_temps, temp_sibling


def step_number(value: object) -> int:
    """``value`` as a step number for the manifest; 0 when it cannot be one."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP:
        return value
    return 0


def save_values(
    path: str | os.PathLike[str],
    values: Mapping[str, Any],
    *,
    step: int,
    capture_rng: bool = True,
    extra_files: Mapping[str, bytes] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """Commit ``values`` as the step directory ``path``, replacing an older one atomically.

    Every value is validated (and the random generators captured) before the first byte is
    written; a refused value names its path (``hyper_parameters.cfg``).

    Args:
        path: the directory to write; an existing step there is replaced only once the new
            one is complete (an exchange on Linux).
        values: entries by name; objects with ``state_dict()`` are stored by their state.
        step: the step number recorded in the manifest.
        capture_rng: store the Python, NumPy and torch generator states as well.
        extra_files: plain files stored beside the entries, hashed and listed too.
        metrics: numbers recorded in the manifest.

    Returns:
        The committed directory.

    Raises:
        UnsupportedValueError: a name or value cannot be stored without pickle.
        StorageFullError: the disk filled up (the previous step at ``path`` is intact).
    """
    final = Path(path)
    states = rng.capture() if capture_rng else None  # first: as close to the call as can be
    entries = [prepare(str(name), value) for name, value in values.items()]
    if states is not None:
        entries.append(prepare(RNG_ENTRY, states, internal=True))
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent)
    write_step(
        final,
        step,
        entries,
        overwrite=True,
        manifest_fields={"metrics": dict(metrics or {})},
        extra_files=extra_files,
    )
    return final


def load_values(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read and verify the step at ``path``.

    Returns:
        Every entry by name (tensors on the CPU, in memory of their own), and the generator
        states saved with it (checked to be restorable) or None.

    Raises:
        TorchkeepFileNotFoundError: ``path`` holds no committed step.
        CorruptFileError: a file is missing, truncated or fails its hash.
    """
    loaded = read_step(Path(path))
    values = {name: loaded.value(name) for name in loaded.entries if name != RNG_ENTRY}
    states = loaded.value(RNG_ENTRY) if RNG_ENTRY in loaded.entries else None
    return values, states


def remove_step(path: str | os.PathLike[str]) -> None:
    """Remove a step directory (or a plain file): renamed out of sight first, then deleted."""
    target = Path(path)
    if target.is_symlink() or target.is_file():
        target.unlink()
        return
    if not target.is_dir():
        return
    hidden = temp_sibling(target)
    os.rename(target, hidden)
    shutil.rmtree(hidden, ignore_errors=True)
