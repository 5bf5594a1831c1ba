"""List what loading pickled files would import and call, without executing them."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.text import Text

from ..errors import TorchkeepError
from ..security import scan
from ._output import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PROBLEM,
    console,
    plain,
    print_error,
    print_json,
    print_table,
)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or bundles")
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PREFIX",
        help="module prefix whose classes you trust (repeatable), as for load_pickled_model",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every file is loadable (with --allow), 1 when one is not (unsafe, or damaged:
    ``report.problems``), 2 on an error."""
    code = EXIT_OK
    reports = []
    for path in args.paths:
        try:
            report = scan(path)
        except (TorchkeepError, OSError) as exc:
            print_error(str(exc))
            code = EXIT_ERROR
            continue
        offending = report.offending(args.allow)
        if (offending or report.problems) and code == EXIT_OK:
            code = EXIT_PROBLEM
        reports.append(report.to_json() | {"offending": [f.name for f in offending]})
        if args.json:
            continue
        verdict = (
            Text("UNSAFE", style="bold red") if report.dangerous
            else Text("needs --allow", style="yellow") if offending
            else Text("DAMAGED", style="bold red") if report.problems
            else Text("clean", style="green")
        )  # fmt: skip
        console.print(plain(f"{report.path} ({report.format.value}): ") + verdict)
        if report.findings:
            print_table(
                None,
                ["severity", "name", "kind", "count", "where", "why"],
                [
                    (f.severity.value, f.name, f.kind, f.count, f.where, f.reason)
                    for f in report.findings
                ],
                right_align=["count"],
            )
        for problem in report.problems:
            console.print(plain(f"problem: {problem}"))
        for note in report.notes:
            console.print(plain(f"note: {note}"))
    if args.json:
        print_json(reports)
    return code
