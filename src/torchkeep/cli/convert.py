"""Convert torch.save files to .safetensors and back, or into a checkpoint step or a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..convert import ROUTES, convert
from ._output import EXIT_OK, console, human_bytes, plain, print_json
from ._remote import add_storage_options, location, url_keywords


def register(parser: argparse.ArgumentParser) -> None:
    routes = ", ".join(f"{a} -> {b}" for a, b in ROUTES)
    parser.description = (
        "The source's format is recognised by its content, the destination's by its suffix "
        f"({routes}). To a file, a tutorial-style checkpoint dict converts its model part; to "
        "a directory it becomes a torchkeep checkpoint step, and a pickled whole model "
        "becomes a bundle (its classes trusted with --allow). A sharded checkpoint step "
        "(saved by several ranks) to a .safetensors file is merged into full tensors."
    )
    parser.add_argument("source", type=location, help="file to read (or its URL)")
    parser.add_argument(
        "destination", type=location, help="file or directory to write (or its URL)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite the destination")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PREFIX",
        help="module prefix whose classes a pickled whole model may use (repeatable); "
        "see `torchkeep scan`",
    )
    add_storage_options(parser)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _sharded_step(path: Path | str) -> bool:
    """True for a sharded checkpoint step (``torchkeep convert STEP out.safetensors``)."""
    from ..checkpoint.layout import read_step_manifest
    from ..errors import TorchkeepError

    if isinstance(path, str) or not path.is_dir():
        return False
    try:
        return read_step_manifest(path).get("layout") == "sharded-v1"
    except TorchkeepError:
        return False


def run(args: argparse.Namespace) -> int:
    keywords = url_keywords(args, args.source, args.destination)
    if not keywords and _sharded_step(args.source):
        from ..checkpoint import consolidate

        merged = consolidate(args.source, args.destination, force=args.force)
        console.print(
            plain(
                f"consolidated {args.source} (sharded, {merged.world_size} ranks) -> "
                f"{merged.destination} ({human_bytes(_size(merged.destination))}): "
                f"{merged.tensors} full tensors"
            )
        )
        return EXIT_OK
    done = convert(
        args.source,
        args.destination,
        force=args.force,
        allow=args.allow,
        **keywords,
    )
    if args.json:
        print_json(
            {
                "source": done.source,
                "source_format": done.source_format.value,
                "destination": done.destination,
                "size": None if isinstance(done.destination, str) else _size(done.destination),
                "tensors": done.tensors,
                "tied": done.tied,
                "notes": done.notes,
            }
        )
        return EXIT_OK
    # a URL's bytes are in the bucket, not here
    remote = isinstance(done.destination, str)
    shown = "" if remote else f" ({human_bytes(_size(Path(done.destination)))})"
    console.print(
        plain(
            f"converted {done.source} ({done.source_format.value}) -> {done.destination}"
            f"{shown}: {done.tensors} tensors, {len(done.tied)} tied"
        )
    )
    for note in done.notes:
        console.print(plain(f"note: {note}"))
    return EXIT_OK
