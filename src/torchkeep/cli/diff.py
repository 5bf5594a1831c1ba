"""Compare the tensors of two files (any readable formats); exit 0 equal, 1 different."""

from __future__ import annotations

import argparse

from ..compare import DiffReport, Status, diff_files
from ._output import EXIT_OK, EXIT_PROBLEM, console, plain, print_json, print_table, tolerance
from ._remote import add_storage_options, location, url_keywords


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Keys only in one file, dtype and shape changes, and the largest absolute difference "
        "per tensor. Values match when |a - b| <= atol + rtol * |b| (NaN matches NaN)."
    )
    parser.add_argument("a", type=location, help="first file (or its URL)")
    parser.add_argument("b", type=location, help="second file (or its URL)")
    parser.add_argument(
        "--rtol", type=tolerance, default=0.0, help="relative tolerance (default 0)"
    )
    parser.add_argument(
        "--atol", type=tolerance, default=0.0, help="absolute tolerance (default 0)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_storage_options(parser)


def _print(report: DiffReport) -> None:
    if report.only_in_a or report.only_in_b:
        print_table(
            "keys in one file only",
            ["key", "only in"],
            [(key, report.a) for key in report.only_in_a]
            + [(key, report.b) for key in report.only_in_b],
        )
    changed = [t for t in report.tensors if t.status != Status.IDENTICAL]
    if changed:
        print_table(
            "tensors that differ",
            ["name", "status", "dtype", "shape", "max |a-b|", "outside tol."],
            [
                (
                    t.name,
                    t.status.value,
                    " -> ".join(dict.fromkeys(t.dtypes)),
                    " -> ".join(dict.fromkeys(str(list(s)) for s in t.shapes)),
                    "" if t.max_abs_diff is None else f"{t.max_abs_diff:.6g}",
                    t.outside,
                )
                for t in changed
            ],
            right_align=["max |a-b|", "outside tol."],
        )
    counts = ", ".join(
        f"{report.count(status)} {status.value}" for status in Status if report.count(status)
    )
    verdict = "equal" if report.equal else "different"
    tolerance = (
        f" (rtol={report.rtol:g}, atol={report.atol:g})" if report.rtol or report.atol else ""
    )
    console.print(
        plain(
            f"{verdict}{tolerance}: {counts or 'no common tensors'}; "
            f"{len(report.only_in_a)} only in A, {len(report.only_in_b)} only in B"
        )
    )


def run(args: argparse.Namespace) -> int:
    keywords = url_keywords(args, args.a, args.b)
    report = diff_files(args.a, args.b, rtol=args.rtol, atol=args.atol, **keywords)
    if args.json:
        print_json(report.to_json())
    else:
        _print(report)
    return EXIT_OK if report.equal else EXIT_PROBLEM
