"""The declarative schema vocabulary of torchkeep.schema, beyond what the document suites use."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from torchkeep.errors import InvalidDocumentError
from torchkeep.onnx.stored_report import parse_stored_report
from torchkeep.schema import Array, Int, Number, Object, Satisfies, parse_json_document, validate


@pytest.mark.parametrize("value", [0.0, 1.5, math.inf, math.nan])
def test_a_nonfinite_number_is_accepted_only_inside_the_range(value: float) -> None:
    validate(value, Number(min=0.0, allow_nonfinite=True), source="x")


@pytest.mark.parametrize("value", [-1.0, -math.inf])
def test_an_infinity_outside_the_range_is_refused(value: float) -> None:
    with pytest.raises(InvalidDocumentError, match="must be between"):
        validate(value, Number(min=0.0, allow_nonfinite=True), source="x")


def test_satisfies_reports_its_problem_at_the_key() -> None:
    even = Satisfies(Int(), lambda n: None if n % 2 == 0 else "is odd")
    schema = Object({"sizes": Array(even)})
    assert validate({"sizes": [2, 4]}, schema, source="x") == {"sizes": [2, 4]}
    with pytest.raises(InvalidDocumentError, match=r"x is not .*: sizes\[1\] is odd"):
        validate({"sizes": [2, 3]}, schema, source="x")
    with pytest.raises(InvalidDocumentError, match=r"sizes\[0\] must be an integer"):
        validate({"sizes": ["2"]}, schema, source="x")  # the base schema runs first


def test_the_fix_ends_the_message() -> None:
    with pytest.raises(InvalidDocumentError, match=r"; do this instead$"):
        parse_json_document(b"[", source="x", fix="do this instead")


@pytest.mark.parametrize(
    ("diff", "valid"),
    [("NaN", True), ("Infinity", True), ("0.5", True), ("-Infinity", False), ("-0.5", False)],
)
def test_a_stored_onnx_diff_may_be_nan_or_infinite_but_never_negative(
    diff: str, valid: bool
) -> None:
    text = '{"max_diffs": {"y": {"max_abs_diff": ' + diff + ', "max_rel_diff": 0}}}'
    if valid:
        parse_stored_report(text, path=Path("net.onnx"))
    else:
        with pytest.raises(InvalidDocumentError, match=r"max_diffs\['y'\]\.max_abs_diff"):
            parse_stored_report(text, path=Path("net.onnx"))
