"""Reading the export report an ``.onnx`` file carries in ``metadata_props``, as untrusted data.

:func:`torchkeep.export_onnx` stores its :class:`~torchkeep.onnx.report.OnnxReport` summary as
JSON under :data:`~torchkeep.onnx.report.REPORT_KEY`. Anyone can edit that string, so it is
checked like every document torchkeep reads, before anything uses it: bounded size and nesting
(checked on the text, before the JSON parser recurses), no duplicate keys, and a schema of the
fields ``export_onnx`` writes, each with its type and range. Unknown fields are ignored (a newer
torchkeep may add some); a known field of the wrong shape makes the whole report invalid.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError
from .report import REPORT_KEY

MAX_REPORT_CHARS = 1024**2
"""The longest report accepted: real ones are a few KiB even with hundreds of outputs."""

MAX_REPORT_DEPTH = 8
"""The deepest nesting accepted (the schema itself needs 3)."""

_MAX_INT = 2**31 - 1
_MAX_STRING = 4096
_MAX_ITEMS = 100_000
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _string(value: object) -> bool:
    return isinstance(value, str) and len(value) <= _MAX_STRING


def _optional_string(value: object) -> bool:
    return value is None or _string(value)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INT


def _tolerance(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _difference(value: object) -> bool:  # a measured difference may honestly be inf or NaN
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not value < 0


def _list_of(check: Callable[[object], bool]) -> Callable[[object], bool]:
    def valid(value: object) -> bool:
        return isinstance(value, list) and len(value) <= _MAX_ITEMS and all(map(check, value))

    return valid


def _diffs(value: object) -> bool:
    """``{output: {"max_abs_diff": x, "max_rel_diff": y}}``."""
    return (
        isinstance(value, dict)
        and len(value) <= _MAX_ITEMS
        and all(
            _string(output)
            and isinstance(entry, dict)
            and set(entry) == {"max_abs_diff", "max_rel_diff"}
            and all(map(_difference, entry.values()))
            for output, entry in value.items()
        )
    )


SCHEMA: dict[str, tuple[Callable[[object], bool], str]] = {
    "producer": (_string, "a string"),
    "torch_version": (_string, "a string"),
    "exporter": (_string, "a string"),
    "fallback_reason": (_optional_string, "a string or null"),
    "opset": (_count, "an integer in [0, 2**31)"),
    "inputs": (_list_of(_string), "a list of strings"),
    "outputs": (_list_of(_string), "a list of strings"),
    "dynamic_batch": (lambda v: isinstance(v, bool), "true or false"),
    "export_batch_size": (_count, "an integer in [0, 2**31)"),
    "verified_batch_sizes": (_list_of(_count), "a list of integers in [0, 2**31)"),
    "rtol": (_tolerance, "a finite number >= 0"),
    "atol": (_tolerance, "a finite number >= 0"),
    "max_diffs": (_diffs, "{output: {max_abs_diff: number, max_rel_diff: number}}"),
}
"""Field -> (check, what it must be), for every field :meth:`OnnxReport.metadata` writes."""


def _depth(text: str) -> int:
    """The deepest bracket nesting in JSON ``text``, brackets inside strings skipped."""
    depth = deepest = 0
    for token in _TOKENS.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif bracket in "]}":
            depth -= 1
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} is given twice")
        result[key] = value
    return result


def parse_stored_report(text: str, *, path: Path) -> dict[str, Any]:
    """Parse and validate the report stored in ``path``'s ``metadata_props``.

    Args:
        text: the value stored under :data:`~torchkeep.onnx.report.REPORT_KEY`.
        path: the ``.onnx`` file, for messages.

    Returns:
        The report's fields (only the known ones, each valid).

    Raises:
        CorruptFileError: the text is too long or too deep, is not a JSON object, repeats a key,
            or a known field has the wrong type or range; the message names the field.

    Example:
        >>> parse_stored_report('{"opset": 18}', path=Path("net.onnx"))
        {'opset': 18}
    """

    def invalid(problem: str) -> CorruptFileError:
        return CorruptFileError(
            f"{path}: the stored export report (metadata_props {REPORT_KEY!r}) {problem}; it "
            "was not written by torchkeep or was edited since. Export the model again to get "
            "a report you can trust"
        )

    if len(text) > MAX_REPORT_CHARS:
        raise invalid(f"is {len(text):,} characters long, more than {MAX_REPORT_CHARS:,}")
    if _depth(text) > MAX_REPORT_DEPTH:
        raise invalid(f"nests deeper than {MAX_REPORT_DEPTH} levels")
    try:
        stored = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, duplicate keys
        raise invalid(f"is not valid JSON ({exc})") from exc
    if not isinstance(stored, dict):
        raise invalid(f"is a JSON {type(stored).__name__}, not an object")
    for field, (check, expected) in SCHEMA.items():
        if field in stored and not check(stored[field]):
            raise invalid(f"has field {field!r} that is not {expected}")
    return {field: stored[field] for field in SCHEMA if field in stored}
