"""The one place the CLI prints: rich tables for people, JSON for programs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from rich.align import AlignMethod
from rich.console import Console, ConsoleDimensions, JustifyMethod
from rich.rule import Rule
from rich.style import Style
from rich.table import Table
from rich.text import Text

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_ERROR = 2


# The width of output that goes to a file or a pipe: lines are never wrapped there, so a long
# tensor name or path stays whole for grep and logs (a COLUMNS setting still wins).
UNWRAPPED_WIDTH = 1 << 16

# A rule (a section heading of the demo) has no natural width: off a terminal it is drawn this wide.
RULE_WIDTH = 100


class _Console(Console):
    """A rich console that leaves a closed pipe to the CLI's guard (rich would exit 1 itself)
    and does not wrap output that is not going to a terminal."""

    @property
    def size(self) -> ConsoleDimensions:
        found = Console.size.fget(self)  # type: ignore[attr-defined]
        columns = self._environ.get("COLUMNS", "")
        if self._width is None and not self.is_terminal and not columns.isdigit():
            return ConsoleDimensions(UNWRAPPED_WIDTH, found.height)
        return found  # type: ignore[no-any-return]

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def rule(
        self,
        title: str | Text = "",
        *,
        characters: str = "\u2500",
        style: str | Style = "rule.line",
        align: AlignMethod = "center",
    ) -> None:
        """A horizontal rule, as wide as the terminal, or :data:`RULE_WIDTH` off a terminal."""
        line = Rule(title, characters=characters, style=style, align=align)
        self.print(line, width=RULE_WIDTH if self.width == UNWRAPPED_WIDTH else None)

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError("the reader of torchkeep's output closed the pipe")


console = _Console(highlight=False)
error_console = _Console(stderr=True, highlight=False)


def plain(value: object) -> Text:
    """``value`` as text shown literally: no rich markup, control characters escaped.

    Names and messages come from files, which may be hostile: ``[/]`` must not break the
    output and an escape sequence must not reach the terminal.
    """
    text = str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in text)
    return Text(text)


def labelled(label: str, message: object, *, style: str) -> Text:
    """``label`` in ``style`` followed by ``message`` shown literally (it may come from a file)."""
    return Text(label, style=style) + plain(message)


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the CLI: one line on stderr, shown literally (a warning can
    quote a name from a hostile file, which must not reach the terminal as escape sequences)."""
    error_console.print(labelled("warning: ", message, style="yellow"), soft_wrap=True)


def print_error(message: str) -> None:
    """Print an error for a person, on stderr."""
    error_console.print(labelled("error: ", message, style="bold red"), soft_wrap=True)


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout (paths and other objects via ``str``)."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def print_table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    right_align: Sequence[str] = (),
    show_header: bool = True,
) -> None:
    """Print a table; ``right_align`` names the numeric columns."""
    table = Table(
        title=None if title is None else plain(title),
        title_justify="left",
        show_header=show_header,
    )
    for column in columns:
        justify: JustifyMethod = "right" if column in right_align else "left"
        table.add_column(column, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(*(plain(cell) for cell in row))
    console.print(table)


def tolerance(text: str) -> float:
    """An ``argparse`` type: a tolerance, a number >= 0 (NaN and negatives are refused)."""
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text} is not a tolerance: give a number >= 0")
    return value


def human_bytes(size: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
