"""The column checks of a safetensors header accept only what the thorough checks accept.

``read_header`` validates a well-formed header column by column (every field of every entry at
once, in C-level builtins) and re-checks any header that fails there entry by entry, with the
messages of the thorough checks. These tests attack the column checks directly: each hostile
entry below passes some of them, and must still be refused with the thorough check's words; a
property test compares both checks on generated headers; and a shape of very many dimensions
is refused without computing its product (which takes time quadratic in its length).
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep as tk
from torchkeep.errors import CorruptFileError
from torchkeep.formats import safetensors as stf


def _file(tmp_path: Path, header: dict[str, Any], data: bytes) -> Path:
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path = tmp_path / "columns.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _entry(dtype: object, shape: object, offsets: object) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


A = _entry("F32", [2, 3], [0, 24])  # 24 bytes
B = _entry("I64", [2], [24, 40])  # 16 bytes

# id -> (header, data length, words of the thorough check's message)
HOSTILE: dict[str, tuple[dict[str, Any], int, str]] = {
    "offsets-an-integer": ({"a": A, "b": _entry("I64", [2], 24)}, 40, "data_offsets"),
    "offsets-an-object": (
        {"a": A, "b": _entry("I64", [2], {"24": 0, "40": 0})},
        40,
        "data_offsets",
    ),
    "three-offsets-one-tensor": ({"t": _entry("F32", [2], [0, 8, 8])}, 8, "data_offsets"),
    "shape-an-object": ({"a": A, "b": _entry("I64", {}, [24, 32])}, 32, "shape"),
    "shape-a-string": ({"a": A, "b": _entry("I64", "", [24, 32])}, 32, "shape"),
    "shape-null": ({"a": A, "b": _entry("I64", None, [24, 32])}, 32, "shape"),
    "dtype-missing": ({"a": A, "b": {"shape": [2], "data_offsets": [24, 40]}}, 40, "dtype"),
    "dtype-a-number": ({"a": A, "b": _entry(8, [2], [24, 40])}, 40, "dtype"),
    "offsets-past-the-end-sizes-agree": ({"a": A, "b": B}, 30, "outside"),
    "negative-offsets-sizes-agree": ({"a": _entry("F32", [2, 3], [-24, 0])}, 0, "outside"),
    "empty-tensor-too-large": (
        # Every dimension within the data section, few enough of them; only the thorough
        # check of entries without elements sees that torch cannot count 40**12 elements.
        {"a": A, "b": B, "z": _entry("F32", [40] * 12 + [0], [40, 40])},
        40,
        "too large",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_entries_that_pass_some_column_checks_get_the_thorough_error(
    tmp_path: Path, case: str
) -> None:
    header, data_len, words = HOSTILE[case]
    path = _file(tmp_path, header, bytes(data_len))
    with pytest.raises(tk.CorruptFileError, match=words) as info:
        tk.load_state_dict(path)
    assert str(path) in str(info.value)


def test_a_shape_of_very_many_dimensions_is_refused_with_a_short_message(tmp_path: Path) -> None:
    """300,000 dimensions of 2: their product has 300,000 bits, and multiplying it out one
    dimension at a time takes time quadratic in the count; the check stops at 2**63."""
    path = _file(tmp_path, {"t": _entry("F32", [2] * 300_000, [0, 4])}, bytes(4))
    with pytest.raises(tk.CorruptFileError, match="too large") as info:
        tk.load_state_dict(path)
    assert len(str(info.value)) < 2_000  # the shape is abbreviated, not printed whole


def test_counting_elements_stops_once_past_what_torch_can_count() -> None:
    looked_at = 0

    def dims() -> Iterator[int]:
        nonlocal looked_at
        for dim in itertools.repeat(2, 1_000):
            looked_at += 1
            yield dim

    assert stf._element_count(dims()) is None
    assert looked_at == 63  # 2**63 is the first product past 2**63 - 1
    assert stf._element_count([3, 0, 5]) == 15  # zero dimensions are skipped
    assert stf._element_count([]) == 1


def test_a_mixed_file_loads_in_header_order_like_the_reference(tmp_path: Path) -> None:
    """The views are made per dtype and then put back in file order."""
    state = {
        "half": torch.randn(3, 2).to(torch.float16),
        "ids": torch.arange(7),
        "w": torch.randn(4, 5),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "mask": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "bf": torch.randn(5).to(torch.bfloat16),
    }
    path = tk.save_weights(state, tmp_path / "mixed.safetensors")
    loaded = tk.load_state_dict(path)
    reference = safetensors.torch.load_file(path)
    assert list(loaded) == list(stf.read_header(path).entries)
    assert set(loaded) == set(reference)
    for name, tensor in reference.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


# --- both checks on generated headers ------------------------------------------------------

_dims = st.one_of(
    st.integers(0, 6), st.just(-1), st.just(True), st.just(2.0), st.just(2**64), st.just(10**6)
)
_shapes = st.one_of(
    st.lists(_dims, max_size=4), st.just({}), st.just(""), st.just(3), st.just(None)
)
_offsets = st.one_of(
    st.lists(st.integers(-8, 80), min_size=2, max_size=2),
    st.lists(st.integers(0, 80), min_size=1, max_size=3),
    st.just([False, 8]),
    st.just("08"),
    st.just(8),
)
_dtypes = st.one_of(
    st.sampled_from(["F32", "I64", "U8", "F16", "BOOL"]), st.just("F128"), st.just(1)
)
_raw_entries = st.one_of(
    st.builds(_entry, _dtypes, _shapes, _offsets),
    st.just(5),
    st.just({"dtype": "F32", "shape": [1]}),
)


def _thorough(
    path: Path, header: dict[str, Any], data_start: int, data_len: int
) -> dict[str, stf.TensorEntry] | None:
    try:
        return {
            name: stf._parse_entry_thoroughly(path, name, raw, data_start, data_len)
            for name, raw in header.items()
        }
    except CorruptFileError:
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.dictionaries(st.sampled_from("abcdef"), _raw_entries, max_size=5),
    data_len=st.integers(0, 80),
)
def test_the_column_checks_accept_only_what_the_thorough_checks_accept(
    header: dict[str, Any], data_len: int
) -> None:
    path = Path("generated.safetensors")
    try:
        columns = stf._parse_columns(path, header, 64, data_len)
    except CorruptFileError:  # an entry without elements failed its thorough check
        columns = None
        assert _thorough(path, header, 64, data_len) is None
    if columns is not None:
        assert columns == _thorough(path, header, 64, data_len)


def test_a_well_formed_header_takes_the_column_checks() -> None:
    """Otherwise the property above would hold vacuously."""
    header = {"a": A, "b": B, "e": _entry("U8", [0, 5], [40, 40]), "s": _entry("F16", [], [40, 42])}
    columns = stf._parse_columns(Path("x"), header, 8, 42)
    assert columns is not None
    assert columns == _thorough(Path("x"), header, 8, 42)
    assert columns["s"] == stf.TensorEntry("s", torch.float16, (), 48, 50)
    assert math.prod(columns["a"].shape) == 6
