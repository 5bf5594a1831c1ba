"""Check a sharded step against its manifest and index without loading it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import CorruptFileError, TorchkeepFileNotFoundError
from ...hashing import HASH_ALGORITHM
from ...manifest import file_problem, files_folder
from ..layout import STATE_NAME
from .layout import read_sharded_state
from .segments import segmented_file_hash


def sharded_step_problems(
    path: Path, manifest: Mapping[str, Any], *, check_hashes: bool = True
) -> list[str]:
    """Everything wrong with the sharded step at ``path`` whose ``manifest`` was read.

    ``state.json`` is checked whole (size, hash, schema); each shard file's size, and with
    ``check_hashes`` its segmented hash (every byte, cut at the tensor boundaries its header
    gives, see :mod:`.segments`).
    """
    files = manifest["files"]
    try:
        folder = files_folder(path, manifest)
    except CorruptFileError as exc:
        return [str(exc)]
    problems = []
    for name, record in files.items():
        shard = name != STATE_NAME
        problem = file_problem(folder, name, record, check_hash=check_hashes and not shard)
        if problem is None and shard and check_hashes:
            try:
                if segmented_file_hash(folder / name) != record["hash"]:
                    problem = (
                        f"{folder / name} does not match its {HASH_ALGORITHM} hash (corrupted)"
                    )
            except CorruptFileError as exc:
                problem = str(exc)
            except OSError as exc:
                problem = f"{folder / name} cannot be read ({exc.strerror or exc})"
        if problem is not None:
            problems.append(problem)
    if STATE_NAME not in files:
        problems.append(f"{path / 'manifest.json'} does not list {STATE_NAME}")
    if problems:
        return problems
    try:
        read_sharded_state(path, manifest)
    except (TorchkeepFileNotFoundError, CorruptFileError) as exc:
        return [str(exc)]
    return []
