"""Sealing a folder another tool wrote: fsync every file, then a hashed manifest, written last.

A sealed folder is complete by construction: its manifest appears (atomically) only after every
file it lists is on disk, so a folder without one, or whose files disagree with it, was torn.
Sub-folders are sealed first, each with a manifest of its own, and listed by the parent's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..hashing import hash_file
from ..manifest import (
    FILE_NAME_PATTERN,
    MANIFEST_NAME,
    FileRecord,
    find_problems,
    read_manifest,
    write_manifest,
)
from ..schema import Array, Str
from ..storage.local import fsync_dir, fsync_file, temp_sibling

KIND = "torchkeep.sealed"
_SUBFOLDERS = "sealed_folders"
MAX_DEPTH = 32
"""Levels of sealed sub-folders a check follows."""
_FIELDS = {_SUBFOLDERS: Array(Str(max_len=255, pattern=FILE_NAME_PATTERN), max_len=10_000)}


def seal(folder: Path) -> None:
    """Fsync every file of ``folder`` (recursively) and commit its manifest last.

    Raises:
        OSError: a file cannot be read or the manifest cannot be written.
    """
    files: dict[str, FileRecord] = {}
    subfolders = []
    for child in sorted(folder.iterdir()):
        if child.name == MANIFEST_NAME or child.name.startswith("."):
            continue
        if child.is_dir() and not child.is_symlink():
            seal(child)
            subfolders.append(child.name)
        elif child.is_file() and not child.is_symlink():
            fsync_file(child)
            files[child.name] = FileRecord(*hash_file(child))
    staging = temp_sibling(folder / MANIFEST_NAME)
    staging.mkdir()
    try:
        write_manifest(staging, kind=KIND, files=files, sealed_folders=subfolders)
        fsync_file(staging / MANIFEST_NAME)
        os.replace(staging / MANIFEST_NAME, folder / MANIFEST_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(folder)


def problems(folder: Path, *, depth: int = 0) -> list[str]:
    """Everything that makes the sealed ``folder`` incomplete or damaged (empty: intact).

    A listed sub-folder must be a real folder inside ``folder`` (a link could lead out of it,
    or back into it, which would make the check endless) and at most :data:`MAX_DEPTH` levels
    deep.
    """
    found = find_problems(folder, kind=KIND, fields=_FIELDS, required=(_SUBFOLDERS,))
    if found:
        return found
    manifest = read_manifest(folder, kind=KIND, fields=_FIELDS, required=(_SUBFOLDERS,))
    subfolders: list[str] = manifest[_SUBFOLDERS]
    for name in subfolders:
        sub = folder / name
        if sub.is_symlink() or not sub.is_dir():
            found.append(f"{sub} is listed as a sealed folder but is a link or not a folder")
        elif depth >= MAX_DEPTH:
            found.append(f"{sub} is sealed more than {MAX_DEPTH} folders deep")
        else:
            found += problems(sub, depth=depth + 1)
    listed = set(manifest["files"]) | set(subfolders) | {MANIFEST_NAME}
    found += [
        f"{folder / name} is not listed in {MANIFEST_NAME} (added after the seal)"
        for name in sorted(os.listdir(folder))
        if name not in listed and not name.startswith(".")
    ]
    return found
