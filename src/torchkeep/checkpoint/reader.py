"""Read a committed checkpoint step back, verifying every byte against its manifest.

Tensor files are read straight into freshly allocated tensors and hashed from that memory (no
second pass over the file). Nothing is handed to a model or optimizer until every file of the
step has been verified, so a corrupt step never half-loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import tree
from ..errors import ChecksumMismatchError, CorruptFileError
from ..formats import safetensors as st
from ..hashing import HASH_ALGORITHM, hash_file, new_hasher
from ..manifest import MANIFEST_NAME, read_manifest
from .entries import Kind
from .layout import KIND, STATE_NAME


@dataclass
class LoadedStep:
    """A verified step: its manifest and every entry rebuilt as ``(kind, value)``."""

    step: int
    path: Path
    manifest: dict[str, Any]
    entries: dict[str, tuple[Kind, Any]]

    @property
    def metrics(self) -> dict[str, Any]:
        metrics = self.manifest.get("metrics")
        return dict(metrics) if isinstance(metrics, dict) else {}


def _record(directory: Path, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    record = manifest["files"].get(name)
    if not isinstance(record, dict):
        raise CorruptFileError(
            f"{directory / MANIFEST_NAME} does not list {name!r}; the step is damaged"
        )
    path = directory / name
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing; the step is damaged")
    size = path.stat().st_size
    if size != record.get("size"):
        raise CorruptFileError(
            f"{path} has {size} bytes, the manifest says {record.get('size')} (truncated or "
            "replaced); the step is damaged"
        )
    return record


def _mismatch(path: Path) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"{path} does not match its {HASH_ALGORITHM} hash in {MANIFEST_NAME} (corrupted on "
        "disk); restore another step"
    )


def read_tensors(path: Path, expected_hash: object) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file into new memory and check the file's hash."""
    header = st.read_header(path)
    targets = {
        name: torch.empty(entry.shape, dtype=entry.dtype) for name, entry in header.entries.items()
    }
    st.read_into(header, targets)
    hasher = new_hasher()
    with open(path, "rb") as f:
        hasher.update(f.read(header.data_start))
    for entry in sorted(header.entries.values(), key=lambda e: e.begin):
        hasher.update(st.tensor_bytes(targets[entry.name]))
    if hasher.hexdigest() != expected_hash:
        raise _mismatch(path)
    for alias, target in header.aliases.items():
        targets[alias] = targets[target]
    return targets


def _read_state(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    record = _record(directory, manifest, STATE_NAME)
    path = directory / STATE_NAME
    if hash_file(path)[1] != record.get("hash"):
        raise _mismatch(path)
    try:
        state = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("entries"), dict):
        raise CorruptFileError(f"{path} lacks an 'entries' table; the step is damaged")
    return state


def read_step(directory: Path) -> LoadedStep:
    """Read and verify the committed step at ``directory``.

    Args:
        directory: a ``step-<n>`` directory.

    Returns:
        The :class:`LoadedStep`; tensors are on the CPU.

    Raises:
        TorchkeepFileNotFoundError: there is no manifest (never committed).
        CorruptFileError: a file is missing, truncated, fails its hash or is malformed
            (:class:`ChecksumMismatchError` for a hash).

    Example:
        >>> read_step(Path("ckpt/step-00000010")).entries["epoch"]
        ('value', 3)
    """
    manifest = read_manifest(directory, kind=KIND)
    state = _read_state(directory, manifest)
    entries: dict[str, tuple[Kind, Any]] = {}
    for name, raw in state["entries"].items():
        if not isinstance(raw, dict) or raw.get("kind") not in ("stateful", "value"):
            raise CorruptFileError(f"{directory / STATE_NAME}: entry {name!r} is malformed")
        file_name = raw.get("file")
        tensors: dict[str, torch.Tensor] = {}
        if file_name is not None:
            if not isinstance(file_name, str) or "/" in file_name or file_name.startswith("."):
                raise CorruptFileError(f"{directory / STATE_NAME}: bad file name {file_name!r}")
            record = _record(directory, manifest, file_name)
            tensors = read_tensors(directory / file_name, record.get("hash"))
        source = f"{directory / STATE_NAME} (entry {name!r})"
        entries[name] = (raw["kind"], tree.unflatten(raw.get("value"), tensors, source=source))
    step = manifest.get("step")
    return LoadedStep(step if isinstance(step, int) else -1, directory, manifest, entries)
