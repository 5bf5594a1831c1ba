"""List the steps of a checkpoint folder: time, size, metrics, validity and retention."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import retention
from ..checkpoint.layout import StepInfo, list_steps, step_problems, uncommitted_steps
from ..checkpoint.lazy import need
from ..errors import CorruptFileError, TorchkeepFileNotFoundError
from ..manifest import file_problem, files_folder
from ..remote_files import Remote, fetched
from ._output import EXIT_OK, console, human_bytes, labelled, plain, print_json, print_table
from ._remote import add_storage_options, location, storage_options


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", type=location, help="the checkpoint folder, or its URL (s3://...)"
    )
    parser.add_argument("--json", action="store_true", help="print the steps as JSON")
    parser.add_argument(
        "--no-hash", action="store_true", help="check file sizes only (faster for big steps)"
    )
    add_storage_options(parser)


def _local_time(created: float) -> str:
    """A manifest's creation time as local time; a value no clock can show says so."""
    try:
        return datetime.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError, TypeError):
        return f"invalid ({created!r})"


def _metric(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else repr(value)


Problems = Callable[[StepInfo], list[str]]


def _step_problems(check_hashes: bool) -> Problems:
    """Everything wrong with a step (sizes only without ``check_hashes``)."""

    def problems(info: StepInfo) -> list[str]:
        need(info.path)  # a remote folder's copy fetches this step now (one at a time)
        return step_problems(info.path, check_hashes=check_hashes)

    return problems


def _size_problems(info: StepInfo) -> list[str]:
    """The files of a step whose size is not the manifest's (a URL's ``ls --no-hash``: its
    copy has stand-ins of the objects' sizes and no data; ``state.json`` is not read)."""
    need(info.path)
    try:
        folder = files_folder(info.path, info.manifest)
    except CorruptFileError as exc:
        return [str(exc)]
    problems = (
        file_problem(folder, name, record, check_hash=False)
        for name, record in info.manifest["files"].items()
    )
    return [problem for problem in problems if problem is not None]


def _rows(directory: Path, problems: Problems, shown: Path | str) -> list[dict[str, Any]]:
    """One row per committed step; paths in it name ``shown`` (a URL for a fetched copy)."""
    infos = list_steps(directory)
    policy = retention.from_config(infos[-1].manifest.get("retention")) if infos else None
    kept_by = policy.kept_by(infos) if policy is not None else {}
    here, there = str(directory), str(shown)
    return [
        {
            "step": info.step,
            "time": _local_time(info.created),
            "size": info.size,
            "metrics": info.metrics,
            "problems": [problem.replace(here, there) for problem in problems(info)],
            "kept_by": kept_by.get(info.step, []),
            "layout": info.manifest.get("layout", "single"),
            "ranks": info.manifest.get("world_size", 1),
            "path": info.path if shown == directory else f"{there}/{info.path.name}",
        }
        for info in infos
    ]


def print_steps(
    directory: Path,
    *,
    check_hashes: bool = True,
    shown: Path | str | None = None,
    problems: Problems | None = None,
) -> None:
    """Print the table of steps in ``directory`` and any problem found (naming the folder
    ``shown``, when it is a local copy of a URL; ``problems`` checks a step instead of
    :func:`step_problems`)."""
    check = _step_problems(check_hashes) if problems is None else problems
    rows = _rows(directory, check, directory if shown is None else shown)
    print_table(
        f"checkpoints in {directory if shown is None else shown}",
        ["step", "time", "size", "metrics", "valid", "kept by"],
        [
            (
                row["step"],
                row["time"],
                human_bytes(row["size"]),
                " ".join(f"{k}={_metric(v)}" for k, v in row["metrics"].items()) or "-",
                "yes" if not row["problems"] else "NO",
                ", ".join(row["kept_by"]) or "-",
            )
            for row in rows
        ],
        right_align=["step", "size"],
    )
    sharded = [f"{row['step']} ({row['ranks']} ranks)" for row in rows if row["layout"] != "single"]
    if sharded:
        console.print(plain(f"sharded steps, saved by several ranks: {', '.join(sharded)}"))
    for row in rows:
        for problem in row["problems"]:
            console.print(labelled(f"step {row['step']}: ", problem, style="red"), soft_wrap=True)
    for path in uncommitted_steps(directory):
        reason = "; ".join(step_problems(path, check_hashes=False))
        console.print(
            labelled(path.name, f" is not a usable step: {reason}", style="yellow"),
            soft_wrap=True,
        )


def run(args: argparse.Namespace) -> int:
    directory: Path | str = args.directory
    options = storage_options(args, directory)
    if isinstance(directory, str):  # a URL: its committed steps' manifests, then per step
        # --no-hash reads no data (the sizes come from one listing); else one step at a time
        with fetched(Remote(directory, options), sizes_only=args.no_hash) as local:
            check = _size_problems if args.no_hash else _step_problems(True)
            return _list(local, args, directory, check)
    if not directory.is_dir():
        raise TorchkeepFileNotFoundError(f"{directory} is not a folder; check the path")
    return _list(directory, args, directory, _step_problems(not args.no_hash))


def _list(directory: Path, args: argparse.Namespace, shown: Path | str, check: Problems) -> int:
    if not args.json:
        print_steps(directory, shown=shown, problems=check)
        return EXIT_OK
    rows = _rows(directory, check, shown)
    for row in rows:
        row["valid"] = not row["problems"]
    uncommitted = uncommitted_steps(directory)
    print_json({"directory": shown, "steps": rows, "uncommitted": uncommitted})
    return EXIT_OK
