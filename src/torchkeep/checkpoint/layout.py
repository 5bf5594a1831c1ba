"""Where checkpoint steps live on disk and how to list the committed ones.

A checkpoint folder holds one ``step-<zero-padded step>/`` directory per committed step, each
with a ``manifest.json`` of kind :data:`KIND` written last. Anything else in the folder
(temporary directories of interrupted saves, the user's own files) is not a step.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import tree
from ..errors import CorruptFileError, InvalidDocumentError, TorchkeepFileNotFoundError
from ..format_versions import CHECKPOINT, check_version
from ..manifest import (
    FILE_NAME_PATTERN,
    MANIFEST_NAME,
    files_folder,
    find_problems,
    is_save_id,
    read_manifest,
)
from ..paths import lookup
from ..schema import (
    MAX_INT64,
    AnyValue,
    Equals,
    Int,
    Limits,
    Map,
    Null,
    Number,
    Object,
    OneOf,
    Schema,
    Str,
    load_json_document,
)

KIND = "torchkeep.checkpoint"
STATE_NAME = "state.json"
# torchkeep's own entries live under this prefix, which user entry names may not use.
RESERVED_PREFIX = "torchkeep."
RNG_ENTRY = f"{RESERVED_PREFIX}rng"
MAX_STEP = MAX_INT64
STEP_WIDTH = 8
_STEP_DIR = re.compile(rf"step-([0-9]{{{STEP_WIDTH},19}})", re.ASCII)

# Every field a checkpoint manifest adds to the common ones (see torchkeep.manifest).
_MANIFEST_FIELDS: dict[str, Schema] = {
    "step": Int(max=MAX_STEP),
    "metrics": Map(
        Number(allow_nonfinite=True), key=Str(max_len=256), max_len=1000
    ),  # NaN/inf losses are recorded as they were
    # sharded steps (torchkeep.checkpoint.distributed.layout): how the step is laid out and
    # how many ranks wrote it
    "layout": OneOf((Equals("single"), Equals("sharded-v1"))),
    "world_size": Int(min=1, max=1 << 20),
    "retention": Object(
        {
            "keep_last": OneOf((Null(), Int(min=1))),
            "keep_best": Int(),
            "monitor": OneOf((Null(), Str(max_len=256))),
            "mode": OneOf((Equals("min"), Equals("max"))),
            "keep_every": OneOf((Null(), Int(min=1))),
        }
    ),
}
# The newest checkpoint format version this torchkeep reads, per layout: sharded steps are
# version 2 (torchkeep.checkpoint.distributed.layout.FORMAT_VERSION), single-process ones 1.
LAYOUT_VERSIONS = {"single": 1, "sharded-v1": 2}
# ``state.json``: the JSON skeleton of every entry (see torchkeep.tree); tensors are elsewhere.
ENTRY_NAME_PATTERN = r"[^/\\\x00.][^/\\\x00]{0,199}"
STATE_LIMITS = Limits(
    max_bytes=256 << 20,
    max_depth=tree.MAX_DEPTH + 4,
    max_int_digits=len(str(2**tree.MAX_INT_BITS)),
)
STATE_SCHEMA = Object(
    {
        "format_version": Int(min=1, max=1000),  # absent in steps of torchkeep 0.1.0 and 0.2.0
        "step": Int(max=MAX_STEP),
        "entries": Map(
            Object(
                {
                    "kind": OneOf((Equals("stateful"), Equals("value"))),
                    "file": OneOf((Null(), Str(max_len=255, pattern=FILE_NAME_PATTERN))),
                    "value": AnyValue(),
                },
                required=("kind", "file", "value"),
            ),
            key=Str(max_len=200, pattern=ENTRY_NAME_PATTERN),
            max_len=10_000,
        ),
    },
    required=("step", "entries"),
)


def step_path(directory: Path, step: int) -> Path:
    """The directory of ``step`` in ``directory`` (``step-00000042``)."""
    return directory / f"step-{step:0{STEP_WIDTH}d}"


def parse_step(name: str) -> int | None:
    """The step number of a step directory name, or None for any other name.

    Only the names :func:`step_path` writes count: ``step-`` and ASCII digits, zero-padded to
    eight and without extra leading zeros (``step-00000042``, ``step-100000000``), so no two
    names mean one step and no non-ASCII digit (``step-١٢٣``) is ever read as a number.
    """
    match = _STEP_DIR.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if step <= MAX_STEP and name == f"step-{step:0{STEP_WIDTH}d}" else None


@dataclass(frozen=True)
class StepInfo:
    """A committed step as its manifest describes it (file contents are not checked here)."""

    step: int
    path: Path
    created: float
    metrics: dict[str, float]
    size: int
    manifest: dict[str, Any] = field(repr=False, compare=False)

    def metric(self, name: str) -> float | None:
        """The value of metric ``name``, or None when absent or NaN."""
        value = self.metrics.get(name)
        if value is None or math.isnan(value):
            return None
        return float(value)


def read_step_manifest(path: Path, *, name: str | None = None) -> dict[str, Any]:
    """The manifest of the step directory ``path``, checked against the checkpoint schema.

    Besides the common checks of :func:`~torchkeep.manifest.read_manifest`, a directory named
    like a step must have its manifest record that step: ``name``, when ``path`` is another way
    to reach the directory (a pinned ``/proc/self/fd`` entry), else ``path.name``. A directory
    whose name a framework chose (Lightning's ``last.ckpt``) names no step, so any is accepted.

    Raises:
        TorchkeepFileNotFoundError: there is no manifest (never committed).
        CorruptFileError: the manifest is unreadable or invalid.
    """
    manifest = read_manifest(
        path,
        kind=KIND,
        fields=_MANIFEST_FIELDS,
        required=("step",),
    )
    layout = manifest.get("layout", "single")
    if manifest["format_version"] > LAYOUT_VERSIONS[layout]:
        raise CorruptFileError(
            f"{path / MANIFEST_NAME} is of format version {manifest['format_version']}; this "
            f"torchkeep reads {layout} steps up to {LAYOUT_VERSIONS[layout]}. Upgrade torchkeep "
            "to read it"
        )
    name = path.name if name is None else name
    named_step = parse_step(name)
    if named_step is not None and manifest["step"] != named_step:
        raise InvalidDocumentError(
            f"{path / MANIFEST_NAME} records step {manifest['step']} but its directory is "
            f"{name}; the step was renamed or damaged, so it is skipped"
        )
    return manifest


def read_state(path: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Read ``state.json`` of the step at ``path``, bounded and checked against its schema.

    The caller has verified the file's hash; here its structure is checked: a known ``kind``
    for every entry, file names that stay in the directory and are listed in the manifest, and
    the step number of the manifest. The file is in the step's
    :func:`~torchkeep.manifest.files_folder`.

    Raises:
        CorruptFileError: the document is unreadable or invalid, or the data folder the
            manifest names is not a folder inside the step.
        FormatVersionError: a newer torchkeep wrote it.
    """
    source = files_folder(path, manifest) / STATE_NAME
    state: dict[str, Any] = load_json_document(source, schema=STATE_SCHEMA, limits=STATE_LIMITS)
    check_version(CHECKPOINT, state.get("format_version", 1), source=source)
    if state["step"] != manifest["step"]:
        raise InvalidDocumentError(
            f"{source} records step {state['step']}, its manifest {manifest['step']}; the step "
            "is damaged, so it is skipped"
        )
    for name, entry in state["entries"].items():
        if entry["file"] is not None and entry["file"] not in manifest["files"]:
            raise InvalidDocumentError(
                f"{source}: entry {name!r} names the file {entry['file']!r}, which "
                f"{MANIFEST_NAME} does not list; the step is damaged, so it is skipped"
            )
    return state


def read_step_info(path: Path) -> StepInfo | None:
    """Describe the step at ``path``, or None if it is not a committed, valid torchkeep step."""
    step = parse_step(path.name)
    if step is None or not path.is_dir():
        return None
    try:
        manifest = read_step_manifest(path)
    except (TorchkeepFileNotFoundError, CorruptFileError):
        return None
    return StepInfo(
        step=step,
        path=path,
        created=float(manifest["created"]),
        metrics={name: float(value) for name, value in manifest.get("metrics", {}).items()},
        size=sum(record["size"] for record in manifest["files"].values()),
        manifest=manifest,
    )


def step_problems(path: Path, *, check_hashes: bool = True) -> list[str]:
    """Everything wrong with the step directory ``path`` (manifest, files, ``state.json``)."""
    try:
        manifest = read_step_manifest(path)
    except (TorchkeepFileNotFoundError, CorruptFileError) as exc:
        return [str(exc)]
    if manifest.get("layout") == "sharded-v1":
        from .distributed.verify import sharded_step_problems

        problems = sharded_step_problems(path, manifest, check_hashes=check_hashes)
        return problems or _unlisted_entries(path, manifest)
    problems = find_problems(
        path,
        check_hashes=check_hashes,
        kind=KIND,
        fields=_MANIFEST_FIELDS,
        required=("step",),
    )
    if problems:
        return problems
    try:
        state = read_state(path, manifest)
        if check_hashes and RNG_ENTRY in state["entries"]:
            _check_rng_entry(path, manifest, state["entries"][RNG_ENTRY])
    except (TorchkeepFileNotFoundError, CorruptFileError) as exc:
        return [str(exc)]
    return _unlisted_entries(path, manifest)


def _unlisted_entries(path: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Entries of the step directory ``path`` that its manifest does not list: a step holds
    nothing else, so anything more was put there after the commit (never used, but reported).

    A step copied from object storage holds its manifest and its data folder; other folders
    named like a save id are uploads of saves that never committed (copied along by a sync),
    which no reader uses, as on the bucket: they are not reported. Files in the data folder
    are checked like a local step's files.
    """
    listed = manifest["files"]
    data = manifest.get("data")
    if data is None:
        return _unlisted_in(path, listed, keep={MANIFEST_NAME})
    # the data folder is one of the save-id folders; its own entries are checked below
    beside = _unlisted_in(path, {}, keep={MANIFEST_NAME}, skip_save_ids=True)
    return beside + _unlisted_in(path / data, listed, keep=set())


def _unlisted_in(
    folder: Path, listed: Mapping[str, Any], *, keep: set[str], skip_save_ids: bool = False
) -> list[str]:
    """Entries of ``folder`` neither listed nor in ``keep`` (with ``skip_save_ids``, real
    folders named like a save id are not reported either)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return [f"{folder} cannot be listed ({exc.strerror or exc})"]
    return [
        f"{folder / name} is not listed in the manifest; a step holds only the files it lists"
        for name in names
        if name not in keep
        and name not in listed
        and not (skip_save_ids and _is_save_id_folder(folder / name))
    ]


def _is_save_id_folder(path: Path) -> bool:
    """Whether ``path`` is a real folder (not a link) named like an object-storage save id."""
    if not is_save_id(path.name):
        return False
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:  # removed meanwhile: nothing to report
        return True


def _check_rng_entry(path: Path, manifest: Mapping[str, Any], entry: Mapping[str, Any]) -> None:
    """Raise unless the step's random generator states could be restored (as ``restore``
    checks them), reading only their own small tensor file."""
    from . import rng
    from .reader import read_tensors

    file = entry["file"]
    folder = files_folder(path, manifest)
    tensors = read_tensors(folder / file, manifest["files"][file]["hash"]) if file else {}
    source = f"{path / STATE_NAME} ({RNG_ENTRY})"
    rng.check(tree.unflatten(entry["value"], tensors, source=source), source=source)


def list_steps(directory: Path) -> list[StepInfo]:
    """Every committed step in ``directory``, oldest first; an absent directory has none."""
    info = lookup(directory)
    if info is None or not stat.S_ISDIR(info.st_mode):
        return []
    infos = [read_step_info(child) for child in directory.iterdir()]
    return sorted((info for info in infos if info is not None), key=lambda info: info.step)


def uncommitted_steps(directory: Path) -> list[Path]:
    """Step-named directories without a valid checkpoint manifest (damaged or foreign)."""
    return sorted(
        (
            child
            for child in directory.iterdir()
            if parse_step(child.name) is not None and read_step_info(child) is None
        ),
        key=lambda child: parse_step(child.name) or 0,
    )
