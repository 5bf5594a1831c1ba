"""Reading the export report an ``.onnx`` file carries in ``metadata_props``, as untrusted data.

:func:`torchkeep.export_onnx` stores its :class:`~torchkeep.onnx.report.OnnxReport` summary as
JSON under :data:`~torchkeep.onnx.report.REPORT_KEY`. Anyone can edit that string, so it goes
through torchkeep's one bounded JSON reader (:func:`torchkeep.schema.parse_json_document`: size,
nesting checked before the parser recurses, duplicate keys, integer length) and :data:`SCHEMA`,
the fields ``export_onnx`` writes, each with its type and range. Unknown fields are ignored (a
newer torchkeep may add some); a known field of the wrong shape makes the whole report invalid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..schema import (
    Array,
    Bool,
    Int,
    Limits,
    Map,
    Null,
    Number,
    Object,
    OneOf,
    Str,
    parse_json_document,
)
from .report import REPORT_KEY

MAX_REPORT_BYTES = 1024**2
"""The longest report accepted: real ones are a few KiB even with hundreds of outputs."""

MAX_REPORT_DEPTH = 8
"""The deepest nesting accepted (the schema itself needs 3)."""

LIMITS = Limits(max_bytes=MAX_REPORT_BYTES, max_depth=MAX_REPORT_DEPTH, allow_nonfinite=True)
"""Non-finite numbers pass the parser; :data:`SCHEMA` accepts them only as measured diffs."""

_COUNT = Int(min=0, max=2**31 - 1)
_ITEMS = 100_000
_TOLERANCE = Number(min=0.0)  # finite
_DIFFERENCE = Number(min=0.0, allow_nonfinite=True)  # a measured difference may be inf or NaN

SCHEMA = Object(
    {
        "producer": Str(),
        "torch_version": Str(),
        "exporter": Str(),
        "fallback_reason": OneOf((Null(), Str())),
        "opset": _COUNT,
        "inputs": Array(Str(), max_len=_ITEMS),
        "outputs": Array(Str(), max_len=_ITEMS),
        "dynamic_batch": Bool(),
        "export_batch_size": _COUNT,
        "verified_batch_sizes": Array(_COUNT, max_len=_ITEMS),
        "dynamic_axes": Map(Map(Str(), max_len=1024), max_len=_ITEMS),
        "verified_lengths": Array(Map(_COUNT, max_len=1024), max_len=_ITEMS),
        "input_values": Map(Str(), max_len=_ITEMS),
        "notes": Array(Str(), max_len=_ITEMS),
        "rtol": _TOLERANCE,
        "atol": _TOLERANCE,
        "max_diffs": Map(
            Object(
                {"max_abs_diff": _DIFFERENCE, "max_rel_diff": _DIFFERENCE},
                required=("max_abs_diff", "max_rel_diff"),
            ),
            max_len=_ITEMS,
        ),
    }
)
"""Every field :meth:`OnnxReport.metadata` writes, with its type and range."""


def parse_stored_report(text: str, *, path: Path) -> dict[str, Any]:
    """Parse and validate the report stored in ``path``'s ``metadata_props``.

    Args:
        text: the value stored under :data:`~torchkeep.onnx.report.REPORT_KEY`.
        path: the ``.onnx`` file, for messages.

    Returns:
        The report's fields (only the known ones, each valid).

    Raises:
        InvalidDocumentError: the text is too long or too deep, is not a JSON object, repeats a
            key, or a known field has the wrong type or range; the message names the field.

    Example:
        >>> parse_stored_report('{"opset": 18}', path=Path("net.onnx"))
        {'opset': 18}
    """
    stored = parse_json_document(
        text.encode("utf-8", "surrogatepass"),
        source=f"{path}: the stored export report (metadata_props {REPORT_KEY!r})",
        schema=SCHEMA,
        limits=LIMITS,
        fix="export the model again to get a report you can trust",
    )
    return {field: stored[field] for field in SCHEMA.fields if field in stored}
