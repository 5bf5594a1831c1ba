"""Hostile and corrupt files: every one gets a typed error naming the file, nothing runs.

Each case goes through the three ways a file is read: ``tk.load_state_dict``,
``tk.load_weights`` and ``describe`` (the data behind ``torchkeep inspect``).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchkeep as tk
from tests.conftest import assert_state_equal
from torchkeep.describe import Description, describe
from torchkeep.formats import safetensors as stf

Reader = Callable[[Path], object]
READERS: dict[str, Reader] = {
    "load_state_dict": tk.load_state_dict,
    "load_weights": lambda path: tk.load_weights(nn.Linear(3, 2), path, strict=False),
    "describe": describe,
}

# A valid two-tensor file: "a" is float32 [2, 3] (24 bytes), "b" is int64 [2] (16 bytes).
DATA = bytes(range(40))


def entry(dtype: str, shape: list[Any], offsets: list[Any]) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


VALID = {"a": entry("F32", [2, 3], [0, 24]), "b": entry("I64", [2], [24, 40])}


def st_bytes(
    header: object = None,
    data: bytes = DATA,
    *,
    raw: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """A safetensors file from a header object (or raw header bytes) and a data section."""
    body = raw if raw is not None else json.dumps(VALID if header is None else header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def with_entry(name: str, **changes: Any) -> dict[str, Any]:
    header = json.loads(json.dumps(VALID))
    header[name].update(changes)
    return header


def with_metadata(metadata: object) -> dict[str, Any]:
    return {"__metadata__": metadata, **VALID}


def aliases(value: str) -> dict[str, Any]:
    return with_metadata({stf.ALIASES_KEY: value})


GOOD = st_bytes()
UNRECOGNISED = "neither safetensors|cannot describe"  # load_state_dict's words | describe's
HEADER_END = 8 + struct.unpack("<Q", GOOD[:8])[0]

# id -> (file content, expected error, words the message must contain)
CORRUPT_SAFETENSORS: dict[str, tuple[bytes, type[Exception], str]] = {
    "truncated-mid-prefix": (GOOD[:5], tk.FileFormatError, UNRECOGNISED),
    "truncated-after-prefix": (GOOD[:8], tk.FileFormatError, UNRECOGNISED),
    "truncated-mid-header": (GOOD[:30], tk.CorruptFileError, "header claims"),
    "truncated-after-header": (GOOD[:HEADER_END], tk.CorruptFileError, "outside"),
    "truncated-mid-data": (GOOD[: HEADER_END + 30], tk.CorruptFileError, "outside"),
    "truncated-last-byte": (GOOD[:-1], tk.CorruptFileError, "outside"),
    "header-length-beyond-file": (
        st_bytes(length=len(GOOD)),
        tk.CorruptFileError,
        "header claims",
    ),
    "header-length-2^63": (st_bytes(length=2**63), tk.CorruptFileError, "header claims"),
    "header-length-2^64-1": (st_bytes(length=2**64 - 1), tk.CorruptFileError, "header claims"),
    "invalid-json": (st_bytes(raw=b'{"a": {"dtype": "F32",'), tk.CorruptFileError, "JSON"),
    "non-utf8-header": (st_bytes(raw=b'{"\xff\xfe": 1}'), tk.CorruptFileError, "UTF-8"),
    "utf16-header": (
        st_bytes(raw=b"{" + json.dumps(VALID).encode("utf-16-le")[2:]),
        tk.CorruptFileError,
        "JSON",
    ),
    "json-list-header": (st_bytes(raw=b"[1, 2, 3]"), tk.FileFormatError, UNRECOGNISED),
    "deeply-nested-json": (
        st_bytes(raw=b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        tk.CorruptFileError,
        "JSON",
    ),
    "integer-too-long": (
        st_bytes(raw=b'{"a": {"shape": [' + b"9" * 5000 + b"]}}"),
        tk.CorruptFileError,
        "JSON",
    ),
    "duplicate-name": (
        st_bytes(raw=b'{"a": 1, "a": 2}'),
        tk.CorruptFileError,
        "'a' appears twice",
    ),
    "entry-not-an-object": (st_bytes({"a": 5, "b": VALID["b"]}), tk.CorruptFileError, "object"),
    "overlapping-offsets": (
        st_bytes(with_entry("b", data_offsets=[16, 32]), DATA[:32]),
        tk.CorruptFileError,
        "overlaps",
    ),
    "offsets-past-the-end": (
        st_bytes(with_entry("b", data_offsets=[24, 10**12])),
        tk.CorruptFileError,
        "outside",
    ),
    "negative-offset": (
        st_bytes(with_entry("a", data_offsets=[-24, 0])),
        tk.CorruptFileError,
        "outside",
    ),
    "reversed-offsets": (
        st_bytes(with_entry("b", data_offsets=[40, 24])),
        tk.CorruptFileError,
        "outside",
    ),
    "offsets-not-integers": (
        st_bytes(with_entry("b", data_offsets=["24", 40])),
        tk.CorruptFileError,
        "data_offsets",
    ),
    "offsets-bool": (
        st_bytes(with_entry("a", data_offsets=[False, 24])),
        tk.CorruptFileError,
        "data_offsets",
    ),
    "three-offsets": (
        st_bytes(with_entry("b", data_offsets=[24, 32, 40])),
        tk.CorruptFileError,
        "data_offsets",
    ),
    "hole-between-tensors": (
        st_bytes(with_entry("b", data_offsets=[32, 48]), DATA + bytes(8)),
        tk.CorruptFileError,
        "unused bytes",
    ),
    "bytes-after-the-tensors": (st_bytes(data=DATA + b"x"), tk.CorruptFileError, "file has"),
    "unknown-dtype": (st_bytes(with_entry("a", dtype="F128")), tk.CorruptFileError, "dtype"),
    "dtype-not-a-string": (st_bytes(with_entry("a", dtype=["F32"])), tk.CorruptFileError, "dtype"),
    "shape-size-disagreement": (
        st_bytes(with_entry("a", shape=[2, 4])),
        tk.CorruptFileError,
        "needs 32 bytes",
    ),
    "negative-shape": (st_bytes(with_entry("a", shape=[-2, -3])), tk.CorruptFileError, "shape"),
    "bool-shape": (st_bytes(with_entry("b", shape=[True, 2])), tk.CorruptFileError, "shape"),
    "float-shape": (st_bytes(with_entry("b", shape=[2.0])), tk.CorruptFileError, "shape"),
    "shape-not-a-list": (st_bytes(with_entry("b", shape=2)), tk.CorruptFileError, "shape"),
    "shape-product-overflows": (
        st_bytes(with_entry("a", shape=[2**62, 2**62, 2**62])),
        tk.CorruptFileError,
        "too large",
    ),
    "huge-shape-with-a-zero": (
        st_bytes({**VALID, "z": entry("F32", [2**64, 0], [40, 40])}),
        tk.CorruptFileError,
        "too large",
    ),
    "metadata-values-not-strings": (
        st_bytes(with_metadata({"epoch": 3})),
        tk.CorruptFileError,
        "__metadata__",
    ),
    "metadata-a-list": (st_bytes(with_metadata([])), tk.CorruptFileError, "__metadata__"),
    "aliases-not-json": (st_bytes(aliases("{nope")), tk.CorruptFileError, "torchkeep.aliases"),
    "aliases-not-an-object": (st_bytes(aliases("[]")), tk.CorruptFileError, "torchkeep.aliases"),
    "alias-to-missing-tensor": (
        st_bytes(aliases('{"c": "nowhere"}')),
        tk.CorruptFileError,
        "missing tensor",
    ),
    "alias-target-not-a-string": (
        st_bytes(aliases('{"c": ["a"]}')),
        tk.CorruptFileError,
        "missing tensor",
    ),
    "alias-also-stored": (
        st_bytes(aliases('{"b": "a"}')),
        tk.CorruptFileError,
        "also stored",
    ),
    "aliases-deeply-nested": (
        st_bytes(aliases("[" * 100_000)),
        tk.CorruptFileError,
        "torchkeep.aliases",
    ),
    "empty-file": (b"", tk.FileFormatError, "empty"),
}


@pytest.fixture(params=list(READERS))
def read(request: pytest.FixtureRequest) -> Reader:
    return READERS[request.param]


def test_the_valid_base_file_loads(tmp_path: Path) -> None:
    """Each of the three readers sees the two tensors of the base file (checked per reader)."""
    path = tmp_path / "good.safetensors"
    path.write_bytes(GOOD)
    state = READERS["load_state_dict"](path)
    assert isinstance(state, dict)
    assert state["a"].shape == (2, 3)
    assert state["b"].dtype == torch.int64
    assert state["b"].view(torch.uint8).tolist() == list(range(24, 40))
    report = READERS["load_weights"](path)
    assert isinstance(report, tk.LoadReport)
    assert sorted(report.unexpected) == ["a", "b"]
    assert sorted(report.missing) == ["bias", "weight"]
    description = READERS["describe"](path)
    assert isinstance(description, Description)
    seen = {t.name: (t.dtype, t.shape, t.nbytes) for t in description.tensors}
    assert seen == {"a": ("F32", (2, 3), 24), "b": ("I64", (2,), 16)}


@pytest.mark.parametrize("case", list(CORRUPT_SAFETENSORS))
def test_corrupt_safetensors_gets_a_typed_error(tmp_path: Path, read: Reader, case: str) -> None:
    content, error, words = CORRUPT_SAFETENSORS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(error, match=words) as info:
        read(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("length", "words"), [(2**63, "header claims"), (2**64 - 1, "header claims"), (5, "JSON")]
)
def test_read_header_rejects_absurd_lengths(tmp_path: Path, length: int, words: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(st_bytes(length=length))
    with pytest.raises(tk.CorruptFileError, match=words):
        stf.read_header(path)


def test_header_that_is_a_json_list_is_rejected_by_read_header(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(st_bytes(raw=b"[1, 2, 3]"))
    with pytest.raises(tk.CorruptFileError, match="not a JSON object"):
        stf.read_header(path)


def test_directory_is_a_typed_error(tmp_path: Path, read: Reader) -> None:
    (tmp_path / "some_folder").mkdir()
    with pytest.raises(tk.FileFormatError, match="some_folder"):
        read(tmp_path / "some_folder")


def test_missing_path_is_a_typed_error(tmp_path: Path, read: Reader) -> None:
    with pytest.raises(tk.TorchkeepFileNotFoundError, match=r"nothing\.safetensors"):
        read(tmp_path / "nothing.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_refused_without_blocking(tmp_path: Path, read: Reader) -> None:
    os.mkfifo(tmp_path / "pipe.safetensors")  # opening it for reading would block forever
    with pytest.raises(tk.FileFormatError, match="not a regular file"):
        read(tmp_path / "pipe.safetensors")


# --------------------------------------------------------------------------------------------
# pickles that would run code


class RunsShell:
    """Unpickling this runs a shell command that writes the canary file."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"echo pwned > {self.canary}",))


class WritesFile:
    """Unpickling this opens (creates) the canary file without any shell."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.canary), "w"))


def _torch_zip(path: Path, payload: object) -> None:
    torch.save({"weight": torch.ones(2, 3), "payload": payload}, path)


def _torch_legacy(path: Path, payload: object) -> None:
    torch.save({"weight": torch.ones(2, 3), "payload": payload}, path, **_LEGACY)


def _tutorial_checkpoint(path: Path, payload: object) -> None:
    state = {"epoch": 5, "model_state_dict": {"weight": torch.ones(2, 3)}, "optimizer": payload}
    torch.save(state, path)


def _raw_pickle(path: Path, payload: object) -> None:
    path.write_bytes(pickle.dumps(payload, protocol=2))


_LEGACY: dict[str, Any] = {"_use_new_zipfile_serialization": False}
HOSTILE_WRITERS: dict[str, Callable[[Path, object], None]] = {
    "torch-zip": _torch_zip,
    "torch-legacy": _torch_legacy,
    "tutorial-checkpoint": _tutorial_checkpoint,
    "raw-pickle": _raw_pickle,
}


@pytest.mark.parametrize("writer", list(HOSTILE_WRITERS))
@pytest.mark.parametrize("payload", [RunsShell, WritesFile])
def test_pickle_that_would_run_code_is_refused(
    tmp_path: Path, read: Reader, writer: str, payload: type[RunsShell | WritesFile]
) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    HOSTILE_WRITERS[writer](path, payload(canary))
    with pytest.raises(tk.UnsafeCheckpointError, match="could run") as info:
        read(path)
    assert str(path) in str(info.value)
    assert not canary.exists()


def test_protocol_0_pickle_is_not_unpickled(tmp_path: Path, read: Reader) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(RunsShell(canary), protocol=0))
    with pytest.raises(tk.FileFormatError, match=r"evil\.pt"):
        read(path)
    assert not canary.exists()


def test_damaged_pickle_stream_is_corrupt_not_a_crash(tmp_path: Path, read: Reader) -> None:
    path = tmp_path / "damaged.pt"
    path.write_bytes(b"\x80\x02h\x05.")  # BINGET of a memo entry that was never stored
    with pytest.raises(tk.CorruptFileError, match=r"damaged\.pt"):
        read(path)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, -1])
def test_truncated_torch_zip_is_corrupt(tmp_path: Path, read: Reader, cut: float) -> None:
    good = tmp_path / "good.pt"
    torch.save({"weight": torch.arange(100.0), "bias": torch.ones(10)}, good)
    content = good.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(content[: int(len(content) * cut)] if cut > 0 else content[:cut])
    with pytest.raises(tk.CorruptFileError, match=r"cut\.pt") as info:
        read(path)
    assert "truncated" in str(info.value)


def test_pt_suffix_with_safetensors_content_is_read_by_content(tmp_path: Path) -> None:
    path = tmp_path / "liar.pt"
    path.write_bytes(GOOD)
    reference = tmp_path / "honest.safetensors"
    reference.write_bytes(GOOD)
    assert_state_equal(tk.load_state_dict(path), tk.load_state_dict(reference))
    assert describe(path).format.value == "safetensors"


def test_pt_suffix_with_corrupt_safetensors_content_says_safetensors(
    tmp_path: Path, read: Reader
) -> None:
    path = tmp_path / "liar.pt"
    path.write_bytes(st_bytes(with_entry("a", shape=[5])))
    with pytest.raises(tk.CorruptFileError, match="not a valid safetensors file"):
        read(path)


# --------------------------------------------------------------------------------------------
# property: damaged files load to what the reference reader sees, or fail with our error


def _base_file() -> bytes:
    """A real file from save_weights: several dtypes, a 0-dim and an empty tensor, a tied pair."""
    torch.manual_seed(0)
    shared = torch.randn(4, 3)
    state = {
        "embed": shared,
        "head": shared,
        "scale": torch.tensor(2.5, dtype=torch.float64),
        "ids": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(3).to(torch.bfloat16),
        "empty": torch.empty(0, 2, dtype=torch.uint8),
    }
    with tempfile.TemporaryDirectory() as tmp:
        return tk.save_weights(state, Path(tmp) / "base.safetensors").read_bytes()


BASE = _base_file()
BASE_HEADER_END = 8 + struct.unpack("<Q", BASE[:8])[0]


def _check_damaged(path: Path, content: bytes, *, header_intact: bool) -> None:
    """Ours loads what the reference loads, the same; it may refuse more, but only for a
    damaged header: any bytes in the data section are valid values and must load."""
    path.write_bytes(content)
    refusal: tk.TorchkeepError | None = None
    try:
        ours = tk.load_state_dict(path)
        describe(path)
    except tk.TorchkeepError as exc:
        refusal = exc
    if refusal is not None:
        assert not header_intact, f"refused a file whose header is intact: {refusal}"
        assert str(path) in str(refusal)
        return
    reference = safetensors.torch.load(content)  # must accept what we accept ...
    assert set(reference) <= set(ours)
    assert_state_equal({k: ours[k] for k in reference}, reference)  # ... and read the same
    for alias in set(ours) - set(reference):
        assert any(ours[alias] is ours[name] for name in reference)


mutation = st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255))
header_mutation = st.tuples(st.integers(0, BASE_HEADER_END - 1), st.integers(0, 255))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(changes=st.lists(header_mutation | mutation, min_size=1, max_size=4))
def test_mutated_file_loads_like_the_reference_or_raises_ours(
    tmp_path: Path, changes: list[tuple[int, int]]
) -> None:
    content = bytearray(BASE)
    for position, value in changes:
        content[position] = value
    intact = content[:BASE_HEADER_END] == BASE[:BASE_HEADER_END]
    _check_damaged(tmp_path / "mutated.safetensors", bytes(content), header_intact=intact)


@pytest.mark.parametrize("value", [0x00, 0x7F, 0xFF])
def test_any_bytes_in_the_data_section_load(tmp_path: Path, value: int) -> None:
    """A reader that refuses every damaged file would pass the property above vacuously."""
    content = BASE[:BASE_HEADER_END] + bytes([value]) * (len(BASE) - BASE_HEADER_END)
    _check_damaged(tmp_path / "data.safetensors", content, header_intact=True)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(length=st.integers(0, len(BASE) - 1))
def test_truncated_file_always_raises_ours(tmp_path: Path, length: int) -> None:
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(BASE[:length])
    for reader in READERS.values():
        with pytest.raises(tk.FileFormatError):
            reader(path)


def test_unmutated_base_file_loads_exactly(tmp_path: Path) -> None:
    path = tmp_path / "base.safetensors"
    path.write_bytes(BASE)
    state = tk.load_state_dict(path)
    assert state["head"] is state["embed"]
    assert_state_equal(
        {k: v for k, v in state.items() if k != "head"}, safetensors.torch.load(BASE)
    )


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [False, 8]}, "data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": "08"}, "data_offsets"),
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12 bytes"),
    ],
)
def test_entries_that_look_almost_valid_take_the_thorough_checks(
    tmp_path: Path, entry: dict[str, object], words: str
) -> None:
    header = json.dumps({"t": entry}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "almost.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(tk.CorruptFileError, match=words):
        tk.load_state_dict(path)
