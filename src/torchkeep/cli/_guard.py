"""The CLI's top-level guard: every failure becomes an exit code and one line on stderr.

Known failures (a :class:`~torchkeep.errors.TorchkeepError` or an ``OSError``) print their
message; anything else is a bug in torchkeep or a library it calls, reported in one line that
names the error type, the command and the file, and says how to see the traceback (``--debug``
or ``TORCHKEEP_DEBUG=1``). A closed output pipe (``torchkeep ls DIR | head``) ends the command
quietly, and Ctrl-C exits with 130.
"""

from __future__ import annotations

import os
import shlex
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from ..errors import TorchkeepError, first_line
from ._output import EXIT_ERROR, EXIT_OK, print_error, show_warning

EXIT_INTERRUPTED = 130
DEBUG_ENV = "TORCHKEEP_DEBUG"

# An unexpected error quotes at most this much of the command line.
_MAX_COMMAND_CHARS = 300


def debug_requested(argv: Sequence[str]) -> bool:
    """True when ``--debug`` is among the options or ``TORCHKEEP_DEBUG`` is set (not 0).

    Arguments after ``--`` are paths, never options: a file named ``--debug`` does not ask for
    tracebacks.
    """
    options = argv[: list(argv).index("--")] if "--" in argv else argv
    return "--debug" in options or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def _silence_stdout() -> None:
    """Point stdout at the null device so that Python's flush at exit cannot fail again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):  # not a real file (captured output): nothing to flush
        pass


def _unexpected(exc: BaseException, argv: Sequence[str]) -> str:
    command = shlex.join(argv)
    if len(command) > _MAX_COMMAND_CHARS:
        command = command[:_MAX_COMMAND_CHARS] + "..."
    filename = getattr(exc, "filename", None)
    where = f" on {filename}" if filename is not None else ""
    return (
        f"unexpected {type(exc).__name__}{where} while running `torchkeep {command}`: "
        f"{first_line(exc)}. This is a bug in torchkeep: run the command again with --debug "
        "(or TORCHKEEP_DEBUG=1) to see the traceback, and please report it with that output"
    )


def run_guarded(run: Callable[[], int], argv: Sequence[str]) -> int:
    """Call ``run`` (a whole CLI command) and turn every way it can fail into an exit code.

    Args:
        run: the command; returns its exit code.
        argv: the command-line arguments, for messages and the ``--debug`` flag.

    Returns:
        ``run``'s code, 2 for an error, 130 for Ctrl-C.
    """
    debug = debug_requested(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            # torchkeep's own warnings (a skipped step) are part of the output, shown as lines
            # even where the process turns warnings into errors (as the test suite does)
            warnings.filterwarnings("always", module=r"torchkeep(\.|$)")
            code = run()
        sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
    except KeyboardInterrupt:
        print_error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader (`| head`) has everything it wanted
        _silence_stdout()
        return EXIT_OK
    except (TorchkeepError, OSError) as exc:
        if debug:
            traceback.print_exc()
        print_error(str(exc) or type(exc).__name__)
        return EXIT_ERROR
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print_error(_unexpected(exc, argv))
        return EXIT_ERROR
    return code
