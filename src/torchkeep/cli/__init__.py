"""The ``torchkeep`` command line: one module per command over the library's functions.

Exit codes: 0 success, 1 a problem was found (differences, corruption, unsafe content),
2 a usage or I/O error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from .._version import __version__
from ..errors import TorchkeepError
from ._output import EXIT_ERROR, print_error

# command name -> module in this package; each module has `register(parser)` and `run(args)`.
COMMANDS = {
    "inspect": "inspect",
    "convert": "convert",
    "diff": "diff",
    "verify": "verify",
    "scan": "scan",
    "ls": "ls",
    "export-onnx": "export_onnx",
    "demo": "demo",
}


def _available_commands() -> dict[str, ModuleType]:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module_name}":
                raise
    return modules


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The argument parser with every available command registered."""
    parser = argparse.ArgumentParser(
        prog="torchkeep",
        description="Save, load, inspect, convert, verify and export PyTorch models safely.",
    )
    parser.add_argument("--version", action="version", version=f"torchkeep {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = _available_commands()
    for name, module in modules.items():
        sub = subparsers.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.register(sub)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used as the console-script entry point)."""
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = modules[args.command].run(args)
    except (TorchkeepError, OSError) as exc:
        print_error(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
