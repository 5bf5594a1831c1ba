"""Convert weights between torch.save files (.pt/.pth/.bin) and .safetensors, bit for bit."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..convert import ROUTES, convert
from ._output import EXIT_OK, console, human_bytes, plain


def register(parser: argparse.ArgumentParser) -> None:
    routes = ", ".join(f"{a} -> {b}" for a, b in ROUTES)
    parser.description = (
        "The source's format is recognised by its content, the destination's by its suffix "
        f"({routes}). A tutorial-style checkpoint dict converts its model part."
    )
    parser.add_argument("source", type=Path, help="file to read")
    parser.add_argument("destination", type=Path, help="file to write")
    parser.add_argument("--force", action="store_true", help="overwrite the destination")


def run(args: argparse.Namespace) -> int:
    done = convert(args.source, args.destination, force=args.force)
    size = human_bytes(done.destination.stat().st_size)
    console.print(
        plain(
            f"converted {done.source} ({done.source_format.value}) -> {done.destination} "
            f"({size}): {done.tensors} tensors, {len(done.tied)} tied"
        )
    )
    for note in done.notes:
        console.print(plain(f"note: {note}"))
    return EXIT_OK
