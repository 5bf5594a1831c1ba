"""Bounded JSON parsing and declarative schemas for every JSON document torchkeep reads.

A manifest, a ``state.json`` or a bundle's ``config.json`` may be hostile: valid JSON with the
wrong types, values out of range, nesting deep enough to exhaust the stack, integers thousands of
digits long or ``NaN`` where a number must be finite. :func:`load_json_document` parses a document
within :class:`Limits` (size, depth checked before any recursion, integer length, non-finite
numbers, duplicate keys) and then checks it against a schema built from the small classes below,
so callers only ever see a value of the shape they asked for, or an
:class:`~torchkeep.errors.InvalidDocumentError` naming the file, the key and the problem.

Example:
    >>> MANIFEST = Object({"size": Int(), "hash": Str(max_len=128)}, required=("size",))
    >>> load_json_document(path, schema=MANIFEST, limits=Limits(max_bytes=1 << 20))
    {'size': 12, 'hash': '...'}
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import InvalidDocumentError, TorchkeepFileNotFoundError, UnreadableFileError

MAX_INT64 = 2**63 - 1
DEFAULT_FIX = "use another copy (a checkpoint resume falls back to the previous step)"
"""The advice ending an :class:`InvalidDocumentError` when the caller gives none."""


@dataclass(frozen=True)
class Limits:
    """Bounds a document must respect before it is parsed into Python objects.

    Attributes:
        max_bytes: largest accepted file, in bytes.
        max_depth: deepest accepted nesting of arrays and objects (the top level is 1).
        max_int_digits: longest accepted integer literal, in digits.
        allow_nonfinite: accept ``NaN``, ``Infinity`` and ``-Infinity`` (and floats that overflow
            to infinity); otherwise they make the document invalid.
    """

    max_bytes: int = 16 << 20
    max_depth: int = 32
    max_int_digits: int = 40
    allow_nonfinite: bool = False


class _Refused(Exception):
    """Raised inside the parser's hooks; turned into an InvalidDocumentError by the caller."""


class Schema(Protocol):
    """A check of one JSON value: raise ``_Refused`` naming the problem, or return."""

    def check(self, value: object, where: str) -> None: ...


def _refuse(where: str, problem: str) -> _Refused:
    return _Refused(f"{where or 'the document'} {problem}")


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class AnyValue:
    """Any JSON value (already bounded in size and depth by the parser)."""

    def check(self, value: object, where: str) -> None:
        return None


@dataclass(frozen=True)
class Null:
    """``null``."""

    def check(self, value: object, where: str) -> None:
        if value is not None:
            raise _refuse(where, f"must be null, not {_type_name(value)}")


@dataclass(frozen=True)
class Bool:
    """``true`` or ``false``."""

    def check(self, value: object, where: str) -> None:
        if not isinstance(value, bool):
            raise _refuse(where, f"must be true or false, not {_type_name(value)}")


@dataclass(frozen=True)
class Int:
    """An integer (not a boolean, not a float) within ``[min, max]``."""

    min: int = 0
    max: int = MAX_INT64

    def check(self, value: object, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _refuse(where, f"must be an integer, not {_type_name(value)}")
        if not self.min <= value <= self.max:
            raise _refuse(where, f"must be between {self.min} and {self.max}, not {value}")


@dataclass(frozen=True)
class Number:
    """An integer or float within ``[min, max]``; non-finite only with ``allow_nonfinite``
    (``NaN`` is then accepted, an infinity only where the range includes it)."""

    min: float = -math.inf
    max: float = math.inf
    allow_nonfinite: bool = False

    def check(self, value: object, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _refuse(where, f"must be a number, not {_type_name(value)}")
        if not math.isfinite(value) and not self.allow_nonfinite:
            raise _refuse(where, f"must be a finite number, not {value}")
        if math.isnan(value):
            return
        if not self.min <= value <= self.max:
            raise _refuse(where, f"must be between {self.min:g} and {self.max:g}, not {value:g}")


@dataclass(frozen=True)
class Str:
    """A string of at most ``max_len`` characters, matching ``pattern`` when given."""

    max_len: int = 4096
    pattern: str | None = None

    def check(self, value: object, where: str) -> None:
        if not isinstance(value, str):
            raise _refuse(where, f"must be a string, not {_type_name(value)}")
        if len(value) > self.max_len:
            raise _refuse(where, f"is a string of {len(value)} characters (limit {self.max_len})")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _refuse(where, f"{value[:80]!r} is not of the expected form")


@dataclass(frozen=True)
class Equals:
    """Exactly ``value`` (a string, number or boolean; compared with its type)."""

    value: object

    def check(self, value: object, where: str) -> None:
        if type(value) is not type(self.value) or value != self.value:
            raise _refuse(where, f"must be {self.value!r}, not {str(value)[:80]!r}")


@dataclass(frozen=True)
class OneOf:
    """A value any of ``options`` accepts (the first option's complaint is reported)."""

    options: tuple[Schema, ...]

    def check(self, value: object, where: str) -> None:
        complaints = []  # messages, not exceptions: a kept exception would hold every frame
        for option in self.options:
            try:
                option.check(value, where)
                return
            except _Refused as exc:
                complaints.append(str(exc))
        if complaints:
            raise _Refused(complaints[0])


@dataclass(frozen=True)
class Array:
    """An array of at most ``max_len`` items, each accepted by ``item``."""

    item: Schema = field(default_factory=AnyValue)
    max_len: int = 1 << 20

    def check(self, value: object, where: str) -> None:
        if not isinstance(value, list):
            raise _refuse(where, f"must be an array, not {_type_name(value)}")
        if len(value) > self.max_len:
            raise _refuse(where, f"has {len(value)} items (limit {self.max_len})")
        for index, item in enumerate(value):
            self.item.check(item, f"{where}[{index}]")


@dataclass(frozen=True)
class Map:
    """An object used as a table: any keys ``key`` accepts, every value accepted by ``value``."""

    value: Schema = field(default_factory=AnyValue)
    key: Str = field(default_factory=Str)
    max_len: int = 1 << 20

    def check(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise _refuse(where, f"must be an object, not {_type_name(value)}")
        if len(value) > self.max_len:
            raise _refuse(where, f"has {len(value)} entries (limit {self.max_len})")
        for name, item in value.items():
            child = f"{where}[{name[:80]!r}]"
            self.key.check(name, f"{child} (the key)")
            self.value.check(item, child)


@dataclass(frozen=True)
class Object:
    """An object with known ``fields``; those in ``required`` must be present, others may be.

    Keys not in ``fields`` are accepted (newer writers may add some) and left unchecked beyond
    the parser's bounds.
    """

    fields: Mapping[str, Schema]
    required: tuple[str, ...] = ()

    def check(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise _refuse(where, f"must be an object, not {_type_name(value)}")
        for name in self.required:
            if name not in value:
                raise _refuse(where, f"lacks the required key {name!r}")
        for name, schema in self.fields.items():
            if name in value:
                schema.check(value[name], f"{where}.{name}" if where else name)


@dataclass(frozen=True)
class Satisfies:
    """A value ``base`` accepts and for which ``problem(value)`` finds nothing wrong.

    For rules the other schemas cannot say (a class path's syntax, a product of sizes):
    ``problem`` returns None for a good value, else what is wrong ("is not a torch dtype").
    """

    base: Schema
    problem: Callable[[Any], str | None]

    def check(self, value: object, where: str) -> None:
        self.base.check(value, where)
        found = self.problem(value)
        if found is not None:
            raise _refuse(where, found)


def _max_depth_exceeded(text: str, limit: int) -> bool:
    """Whether arrays/objects in ``text`` nest deeper than ``limit`` (or do not balance).

    Runs in C-speed passes without recursion: strings are blanked, everything but brackets is
    dropped, then each pass removes the innermost empty pairs; a document of depth ``d`` is
    empty after ``d`` passes.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    strings_removed = re.sub(r'"[^"\\]*(?:\\.[^"\\]*)*"', "", text)
    brackets = re.sub(r"[^\[\]{}]+", "", strings_removed)
    for _ in range(limit):
        reduced = re.sub(r"\[\]|\{\}", "", brackets)
        if not reduced or len(reduced) == len(brackets):  # done, or unbalanced (parser reports)
            return False
        brackets = reduced
    return True


def _parse(text: str, limits: Limits) -> Any:
    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > limits.max_int_digits:
            raise _Refused(
                f"holds an integer of {len(digits)} digits (limit {limits.max_int_digits})"
            )
        return int(digits)

    def parse_float(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value) and not limits.allow_nonfinite:
            raise _Refused(f"holds the number {literal[:40]}, which overflows to infinity")
        return value

    def parse_constant(name: str) -> float:
        if not limits.allow_nonfinite:
            raise _Refused(f"holds {name}, which is not a JSON number")
        return float(name)

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            names = [name for name, _ in pairs]
            duplicate = next(name for name in result if names.count(name) > 1)
            raise _Refused(f"repeats the key {duplicate[:80]!r} in one object")
        return result

    return json.loads(
        text,
        parse_int=parse_int,
        parse_float=parse_float,
        parse_constant=parse_constant,
        object_pairs_hook=unique_keys,
    )


def parse_json_document(
    data: bytes,
    *,
    source: str,
    schema: Schema | None = None,
    limits: Limits = Limits(),
    fix: str = DEFAULT_FIX,
) -> Any:
    """Parse ``data`` (UTF-8 JSON) within ``limits`` and check it against ``schema``.

    Args:
        data: the raw document.
        source: what the document is (a path), named in every error.
        schema: the expected shape; None accepts any value within the limits.
        limits: size, depth, integer and non-finite bounds.
        fix: what the user should do about an invalid document, ending every error message.

    Returns:
        The parsed value.

    Raises:
        InvalidDocumentError: the document is not UTF-8 JSON, breaks a limit or the schema.

    Example:
        >>> parse_json_document(b'{"n": 1}', source="x.json", schema=Object({"n": Int()}))
        {'n': 1}
    """

    def invalid(problem: str) -> InvalidDocumentError:
        return _invalid(source, problem, fix)

    if len(data) > limits.max_bytes:
        raise invalid(f"it has {len(data)} bytes (limit {limits.max_bytes})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"it is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if _max_depth_exceeded(text, limits.max_depth):
        raise invalid(f"it nests arrays/objects deeper than {limits.max_depth} levels")
    try:
        value = _parse(text, limits)
    except _Refused as exc:
        raise invalid(f"it {exc}") from None
    except json.JSONDecodeError as exc:
        raise invalid(f"it is not JSON ({exc})") from None
    except (ValueError, RecursionError) as exc:  # belt and braces: the pre-checks should catch it
        raise invalid(f"it cannot be parsed ({type(exc).__name__}: {str(exc)[:200]})") from None
    if schema is not None:
        validate(value, schema, source=source, fix=fix)
    return value


def _invalid(source: str, problem: str, fix: str) -> InvalidDocumentError:
    return InvalidDocumentError(
        f"{source} is not a valid document: {problem}. It is damaged or was not written by "
        f"torchkeep; {fix}"
    )


def validate(value: object, schema: Schema, *, source: str, fix: str = DEFAULT_FIX) -> Any:
    """Check an already parsed ``value`` against ``schema`` and return it.

    Raises:
        InvalidDocumentError: naming ``source``, the key and the problem, ending with ``fix``.

    Example:
        >>> validate({"n": -1}, Object({"n": Int()}), source="x.json")
        Traceback (most recent call last):
        InvalidDocumentError: x.json is not a valid document: n must be between 0 and ...
    """
    try:
        schema.check(value, "")
    except _Refused as exc:
        raise _invalid(source, str(exc), fix) from None
    return value


def read_bounded(path: Path, max_bytes: int, *, fix: str = DEFAULT_FIX) -> bytes:
    """The bytes of the regular file at ``path``, refusing more than ``max_bytes`` before
    reading them.

    The file is opened without blocking and checked to be a regular file before anything is
    read, so a FIFO or a device put in a document's place cannot hang or flood the reader.

    Raises:
        TorchkeepFileNotFoundError: the file does not exist.
        UnreadableFileError: it cannot be read (permission denied, an I/O error, not a regular
            file, a name the file system cannot look up).
        InvalidDocumentError: it is larger than ``max_bytes``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise TorchkeepFileNotFoundError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise UnreadableFileError(
            f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc}); check its "
            "permissions and the disk"
        ) from None
    with open(fd, "rb", closefd=True) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFileError(f"{path} is not a regular file (a folder, pipe or device)")
        if info.st_size > max_bytes:
            raise InvalidDocumentError(
                f"{path} has {info.st_size} bytes, more than the {max_bytes} allowed for a "
                f"document of its kind: it is damaged or was not written by torchkeep; {fix}"
            )
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise UnreadableFileError(
                f"{path} cannot be read ({exc.strerror or exc}); check the disk"
            ) from None
    return data


def load_json_document(
    path: str | os.PathLike[str],
    *,
    schema: Schema | None = None,
    limits: Limits = Limits(),
    fix: str = DEFAULT_FIX,
) -> Any:
    """Read the JSON document at ``path`` within ``limits`` and check it against ``schema``.

    The one entry point for every JSON file torchkeep reads (manifests, ``state.json``, bundle
    configs): nothing from the file reaches other code before it passed both. Documents held
    elsewhere (an ONNX file's stored report) go through :func:`parse_json_document`.

    Args:
        path: the file.
        schema: the expected shape (see :class:`Object`, :class:`Map`, :class:`Int`, ...); None
            accepts any value within the limits.
        limits: size, depth, integer and non-finite bounds.
        fix: what the user should do about an invalid document, ending every error message.

    Returns:
        The parsed, checked value.

    Raises:
        TorchkeepFileNotFoundError: the file does not exist.
        UnreadableFileError: it cannot be read, or is not a regular file.
        InvalidDocumentError: it is too large, not UTF-8 JSON, breaks a limit or the schema.

    Example:
        >>> load_json_document("bundle/config.json", schema=Object({"class": Str()}, ("class",)))
    """
    path = Path(path)
    data = read_bounded(path, limits.max_bytes, fix=fix)
    return parse_json_document(data, source=str(path), schema=schema, limits=limits, fix=fix)
