"""Check checkpoints and model bundles against their manifests, listing every problem."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint.layout import parse_step, step_problems
from .checkpoint.lazy import need
from .errors import FileFormatError, TorchkeepError
from .formats import Format, detect_format
from .manifest import files_folder, find_problems, read_manifest
from .model.config import read_config
from .model.layout import content_problems
from .remote_files import StorageOptions, fetched, remote_or_none

if TYPE_CHECKING:
    from .storage.transfer import Transfer


@dataclass
class VerifyReport:
    """What :func:`verify` found.

    Attributes:
        path: the path checked (the URL, for one on object storage).
        format: what it is (a checkpoint step, a checkpoint folder or a model bundle).
        checked: every directory checked, with its problems (missing, truncated or corrupted
            files, a missing or bad manifest); an empty list means intact. Keys are paths, or
            URLs for a URL.
    """

    path: Path | str
    format: Format
    checked: dict[Path | str, list[str]] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        """Every problem found, one line each."""
        return [problem for problems in self.checked.values() for problem in problems]

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    def __str__(self) -> str:
        status = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [f"{self.path} ({self.format.value}): checked {len(self.checked)}, {status}"]
        return "\n".join(lines + [f"  {problem}" for problem in self.problems])


def _bundle_problems(path: Path) -> list[str]:
    """Hash problems, entries the manifest does not list, then the config's schema."""
    problems = find_problems(path)
    try:
        manifest = read_manifest(path)
        folder = files_folder(path, manifest)
    except TorchkeepError:
        return problems  # find_problems has said why
    problems += content_problems(path, manifest)
    if not problems:
        try:
            read_config(folder)
        except TorchkeepError as exc:
            problems.append(str(exc))
    return problems


def verify(
    path: str | os.PathLike[str],
    *,
    storage_options: StorageOptions | None = None,
    transfer: Transfer | None = None,
) -> VerifyReport:
    """Hash every file of a checkpoint step, checkpoint folder or model bundle.

    The manifest and, in a checkpoint step, ``state.json`` are checked against their schemas
    too. A bundle also fails when it holds anything its manifest does not list (files, folders,
    links) or when its ``config.json`` breaks the schema. In a checkpoint folder every
    ``step-<n>`` directory is checked, including ones without a manifest (an interrupted save
    never leaves one; a damaged step might); temporary directories of interrupted saves are
    not steps and are skipped.

    A URL (``s3://bucket/run1``) is fetched first into a private temporary folder: a bundle or
    step as its manifest and the files it lists; a checkpoint folder as its committed steps (on
    object storage a step without a manifest is an upload in progress, not a step). Every byte
    is then hashed by the same checks as on disk, and the report names URLs.

    Args:
        path: a ``step-<n>`` directory, a checkpoint folder or a model bundle, or its URL.
        storage_options: for a URL, options of its fsspec filesystem.
        transfer: for a URL, a :class:`Transfer` (parallel reads, retries, deadline).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is True when nothing is wrong.

    Raises:
        TorchkeepFileNotFoundError: ``path`` does not exist.
        FileFormatError: ``path`` is not one of the directories above.
        RemoteStorageError: for a URL, a read failed for good or the deadline passed.

    Example:
        >>> report = tk.verify("ckpt")
        >>> report.ok, report.problems
        (True, [])
    """
    remote = remote_or_none(path, storage_options, transfer)
    if remote is None:
        return _verify(Path(path))
    with fetched(remote) as local:
        report = _verify(local)
    here, url = str(local), remote.url
    return VerifyReport(
        url,
        report.format,
        {
            str(checked).replace(here, url): [p.replace(here, url) for p in problems]
            for checked, problems in report.checked.items()
        },
    )


def _verify(path: Path) -> VerifyReport:
    """:func:`verify` of a local path."""
    fmt = detect_format(path)  # a missing or impossible path is a typed error here
    if fmt == Format.BUNDLE:
        return VerifyReport(path, fmt, {path: _bundle_problems(path)})
    if fmt == Format.CHECKPOINT_STEP:
        return VerifyReport(path, fmt, {path: step_problems(path)})
    if fmt == Format.CHECKPOINT_DIR:
        report = VerifyReport(path, fmt)
        steps = sorted(
            (c for c in path.iterdir() if c.is_dir() and parse_step(c.name) is not None),
            key=lambda c: parse_step(c.name) or 0,
        )
        for step_dir in steps:
            need(step_dir)  # a remote folder's copy fetches this step now (one at a time)
            report.checked[step_dir] = step_problems(step_dir)
        return report
    if path.is_dir() and parse_step(path.name) is not None:
        return VerifyReport(path, Format.CHECKPOINT_STEP, {path: step_problems(path)})
    raise FileFormatError(
        f"{path} is not a torchkeep checkpoint step, checkpoint folder or model bundle "
        f"(it looks like {fmt.value}); verify checks directories with a manifest.json"
    )
