"""The ``torchkeep`` command line: one module per command over the library's functions.

Exit codes: 0 success, 1 a problem was found (differences, corruption, unsafe content),
2 a usage or I/O error (a bad argument, a file that cannot be read, or an unexpected error),
130 interrupted with Ctrl-C. No input makes the command print a Python traceback unless
``--debug`` (or ``TORCHKEEP_DEBUG=1``) asks for it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from .._version import __version__
from ._guard import run_guarded

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

EPILOG = (
    "exit codes: 0 ok, 1 a problem was found, 2 a usage or I/O error, 130 interrupted. "
    "--debug (or TORCHKEEP_DEBUG=1) shows the traceback of an unexpected error."
)


def _available_commands() -> dict[str, ModuleType]:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module_name}":
                raise
    return modules


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the Python traceback of an unexpected error (also TORCHKEEP_DEBUG=1)",
    )


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The argument parser with every available command registered."""
    parser = argparse.ArgumentParser(
        prog="torchkeep",
        description="Save, load, inspect, convert, verify and export PyTorch models safely.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"torchkeep {__version__}")
    _add_debug(parser, False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = _available_commands()
    for name, module in modules.items():
        sub = subparsers.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.register(sub)
        _add_debug(sub, argparse.SUPPRESS)  # `torchkeep inspect --debug x` works too
    return parser, modules


def _run(argv: Sequence[str]) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 through argparse's SystemExit
    code: int = modules[args.command].run(args)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used as the console-script entry point).

    Never prints a traceback for bad input: failures become one line on stderr and an exit
    code (0 ok, 1 a problem was found, 2 a usage or I/O error, 130 interrupted); ``--debug``
    or ``TORCHKEEP_DEBUG=1`` adds the traceback. Argument errors (and ``--help``,
    ``--version``) leave through argparse's ``SystemExit`` with code 2 (0).
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: _run(arguments), arguments)


if __name__ == "__main__":
    sys.exit(main())
