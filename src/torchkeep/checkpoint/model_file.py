"""The model weights stored in a torchkeep directory, verified before anyone sees them.

``load_state_dict``/``load_weights`` on a checkpoint folder, a checkpoint step or a model bundle
read the model file (``model.safetensors``; in a step, the file its ``state.json`` names for the
``model`` entry, as ``restore`` reads); here its every byte is hashed against the manifest first.
In a checkpoint folder the newest step (by step number, not by name) whose manifest and
``state.json`` are valid and whose model file is intact is used, and every newer step that fails
is named in a warning. ``restore`` also verifies the step's other files, so it can fall back
further than this reader.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import (
    CorruptFileError,
    FileFormatError,
    InvalidDocumentError,
    TorchkeepError,
    TorchkeepFileNotFoundError,
    UnreadableFileError,
)
from ..formats import Format
from ..manifest import MANIFEST_NAME, file_problem, files_folder, read_manifest
from .layout import STATE_NAME, list_steps, read_state, read_step_manifest
from .lazy import need
from .reader import read_tensors

MODEL_FILE = "model.safetensors"


def _verified(
    directory: Path, manifest: dict[str, Any], name: str | None = MODEL_FILE
) -> dict[str, torch.Tensor]:
    record = None if name is None else manifest["files"].get(name)
    if name is None or record is None:
        raise FileFormatError(
            f"{directory / MANIFEST_NAME} lists no {name or MODEL_FILE}: this {directory.name} "
            "holds no model weights (save them with model=...)"
        )
    path = files_folder(directory, manifest) / name
    try:
        if not path.is_file() or path.stat().st_size != record["size"]:
            raise CorruptFileError(
                f"{path} is missing or has another size than its manifest records (truncated "
                "or replaced)"
            )
        return read_tensors(path, record["hash"])
    except OSError as exc:
        if isinstance(exc, TorchkeepError):
            raise
        raise UnreadableFileError(f"{path} cannot be read ({exc.strerror or exc})") from None


def _verified_step(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The model file and tensors of a step whose documents are valid (manifest, hashed
    ``state.json``), so that the step used is the one ``restore`` would use; other tensor files
    are not read. The file is the one ``state.json``'s ``model`` entry names, as for
    ``restore``: a step cannot give ``restore`` one model and this reader another."""
    manifest = read_step_manifest(directory)
    folder = files_folder(directory, manifest)
    if manifest.get("layout") == "sharded-v1":  # written by N ranks: full tensors, verified
        from .distributed.full import model_state

        return folder / STATE_NAME, model_state(directory)
    problem = file_problem(folder, STATE_NAME, manifest["files"].get(STATE_NAME), check_hash=True)
    if problem is not None:
        raise CorruptFileError(f"{problem}; the step is damaged")
    entry = read_state(directory, manifest)["entries"].get("model")
    name = MODEL_FILE if entry is None else entry["file"]
    if name is None and MODEL_FILE in manifest["files"]:
        raise InvalidDocumentError(
            f"{folder / STATE_NAME}: entry 'model' names no tensor file, but the manifest "
            f"lists {MODEL_FILE}; the step is damaged, so it is skipped"
        )
    return folder / (name or MODEL_FILE), _verified(directory, manifest, name)


def _newest_valid_step(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    steps = list_steps(folder)
    if not steps:
        raise TorchkeepFileNotFoundError(f"{folder} holds no committed checkpoint step")
    failures: list[tuple[int, CorruptFileError | TorchkeepFileNotFoundError]] = []
    for info in reversed(steps):
        need(info.path)  # a remote folder's copy fetches this step now
        try:
            return _verified_step(info.path)
        except (CorruptFileError, TorchkeepFileNotFoundError) as exc:
            warnings.warn(
                f"checkpoint step {info.step} is unusable and was skipped: {exc}", stacklevel=5
            )
            failures.append((info.step, exc))
    newest, error = failures[0]
    tried = ", ".join(str(step) for step, _ in failures)
    raise type(error)(
        f"{folder} holds no step with an intact {MODEL_FILE} (tried steps {tried}); the "
        f"newest, {newest}: {error}"
    )


def verified_model_tensors(path: Path, fmt: Format) -> tuple[Path, dict[str, torch.Tensor]]:
    """The model file of the directory ``path`` and its tensors, every byte verified.

    Args:
        path: a checkpoint folder, checkpoint step or model bundle.
        fmt: what :func:`~torchkeep.formats.detect_format` found it to be.

    Returns:
        The file read and its tensors (tied names share one tensor), views of a private mapping
        of bytes that matched the manifest's hash.

    Raises:
        TorchkeepFileNotFoundError: a checkpoint folder has no committed step.
        ChecksumMismatchError: the model file (of every step, in a folder) fails its hash.
        CorruptFileError: a manifest is invalid or a file is missing, truncated or unreadable.
        FileFormatError: the directory holds no model weights or is not a torchkeep directory.
    """
    if fmt == Format.CHECKPOINT_DIR:
        return _newest_valid_step(path)
    if fmt == Format.CHECKPOINT_STEP:
        return _verified_step(path)
    if fmt == Format.BUNDLE:
        manifest = read_manifest(path)
        return files_folder(path, manifest) / MODEL_FILE, _verified(path, manifest)
    raise FileFormatError(
        f"{path} is a directory that is neither a torchkeep checkpoint nor a model bundle"
    )
