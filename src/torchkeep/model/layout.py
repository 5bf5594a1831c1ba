"""What a model bundle directory holds: its file names, and which entries do not belong."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..manifest import files_folder, read_manifest

BUNDLE_KIND = "torchkeep.bundle"
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROGRAM_NAME = "program.pt2"
# Every file a bundle may list in its manifest; none of them is importable Python.
BUNDLE_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, PROGRAM_NAME, "model.onnx", "model.onnx.data"})
_MAX_REPORTED = 20


def walk(directory: Path, limit: int = 10_000) -> list[Path]:
    """Every entry under ``directory`` (links are not followed), at most ``limit`` of them."""
    found: list[Path] = []
    pending = [directory]
    while pending and len(found) < limit:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    found.append(Path(entry.path))
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
        except OSError:
            continue
    return found[:limit]


def bundle_files(bundle: Path) -> Path:
    """The folder holding the files ``bundle``'s manifest lists: the bundle itself, or its
    data folder for a bundle saved on object storage and copied to disk
    (:func:`~torchkeep.manifest.files_folder`).

    Raises:
        TorchkeepFileNotFoundError: the bundle has no manifest.
        CorruptFileError: the manifest is invalid, or its data folder is missing, a link or
            not a folder.
    """
    return files_folder(bundle, read_manifest(bundle, kind=BUNDLE_KIND))


def content_problems(bundle: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Entries of ``bundle`` its manifest does not account for, one line each (empty if none).

    Reported: files the manifest does not list, folders (but the data folder the manifest
    names, in a bundle copied from object storage), symbolic links (anywhere, listed or not),
    and listed names that no bundle holds (``*.py``, ``__init__.py``, ``*.pth`` ...).
    """
    listed = set(manifest["files"])
    data = manifest.get("data")
    names = {f"{data}/{name}" for name in listed} if data else listed
    problems = [
        f"{bundle / MANIFEST_NAME} lists {name!r}, a file no torchkeep bundle holds"
        for name in sorted(listed - BUNDLE_FILES)
    ]
    for entry in sorted(walk(bundle)):
        relative = entry.relative_to(bundle).as_posix()
        if entry.is_symlink():
            problems.append(f"{entry} is a symbolic link; a bundle holds plain files only")
        elif entry.is_dir():
            if relative != data:
                problems.append(f"{entry} is a folder, and a bundle has none (but its data folder)")
        elif relative != MANIFEST_NAME and relative not in names:
            problems.append(f"{entry} is not listed in the manifest")
    if len(problems) > _MAX_REPORTED:
        extra = len(problems) - _MAX_REPORTED
        problems = [*problems[:_MAX_REPORTED], f"... and {extra} more unlisted entries"]
    return problems
