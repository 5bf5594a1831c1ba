"""Show what a weights file, checkpoint, bundle or program holds, without loading its tensors."""

from __future__ import annotations

import argparse
from collections import Counter

from ..describe import Description, describe
from ._output import EXIT_OK, console, human_bytes, plain, print_json, print_table
from ._remote import add_storage_options, location, url_keywords


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", type=location, help="file or directory to describe, or its URL (s3://...)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (every tensor)")
    parser.add_argument(
        "--limit",
        type=int,
        default=50,
        metavar="N",
        help="tensor rows to show in the table (default 50; 0 for all)",
    )
    add_storage_options(parser)


def _summary(description: Description) -> list[tuple[str, str]]:
    dtypes = Counter(t.dtype for t in description.tensors)
    rows = [
        ("format", description.format.value),
        ("size on disk", human_bytes(description.size)),
        ("tensors", f"{len(description.tensors):,}"),
        ("parameters", f"{description.parameter_count:,}"),
        ("tensor bytes", human_bytes(description.tensor_bytes)),
    ]
    if dtypes:
        rows.append(("dtypes", ", ".join(f"{d}: {n}" for d, n in sorted(dtypes.items()))))
    if description.tied:
        rows.append(("tied names", str(sum(len(v) for v in description.tied.values()))))
    return rows


def _print_tensors(description: Description, limit: int) -> None:
    shown = description.tensors if limit <= 0 else description.tensors[:limit]
    print_table(
        "tensors",
        ["name", "dtype", "shape", "size"],
        [(t.name, t.dtype, list(t.shape), human_bytes(t.nbytes)) for t in shown],
        right_align=["size"],
    )
    hidden = len(description.tensors) - len(shown)
    if hidden:
        console.print(f"... {hidden:,} more (--limit 0 shows all, --json lists every tensor)")


def _print(description: Description, limit: int) -> None:
    print_table(str(description.path), ["", ""], _summary(description), show_header=False)
    if description.tensors:
        _print_tensors(description, limit)
    if description.metadata:
        print_table("metadata", ["key", "value"], description.metadata.items())
    if description.tied:
        print_table(
            "tied weights (stored once)",
            ["stored as", "also named"],
            [(name, ", ".join(aliases)) for name, aliases in description.tied.items()],
        )
    for title, rows in description.sections.items():
        print_table(title, ["key", "value"], rows)
    for note in description.notes:
        console.print(plain(f"note: {note}"))


def run(args: argparse.Namespace) -> int:
    description = describe(args.path, **url_keywords(args, args.path))
    if args.json:
        print_json(description.to_json())
    else:
        _print(description, args.limit)
    return EXIT_OK
