"""Check a checkpoint, checkpoint step or model bundle against its content hashes."""

from __future__ import annotations

import argparse
from pathlib import PurePosixPath

from ..verify import verify
from ._output import EXIT_OK, EXIT_PROBLEM, console, labelled, print_json, print_table
from ._remote import add_storage_options, location, url_keywords


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        type=location,
        help="a checkpoint folder, a step-<n> folder or a bundle, or its URL (s3://...)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_storage_options(parser)


def run(args: argparse.Namespace) -> int:
    report = verify(args.path, **url_keywords(args, args.path))
    if args.json:
        print_json(
            {
                "path": report.path,
                "format": report.format.value,
                "ok": report.ok,
                "checked": {str(path): problems for path, problems in report.checked.items()},
                "problems": report.problems,
            }
        )
    else:
        print_table(
            f"{report.path} ({report.format.value})",
            ["checked", "problems"],
            [
                (PurePosixPath(str(path)).name, len(problems))
                for path, problems in report.checked.items()
            ],
            right_align=["problems"],
        )
        for problem in report.problems:
            console.print(labelled("problem: ", problem, style="red"), soft_wrap=True)
        if report.ok:
            console.print("[green]all files match their manifests[/]")
    return EXIT_OK if report.ok else EXIT_PROBLEM
