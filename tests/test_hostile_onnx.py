"""Hostile ``.onnx`` files: every one breaks a plain reader, and torchkeep refuses it by name.

ONNX files carry no code, so the live proofs here are about crashes and wrong reads: each
payload is first given to a plain reader in a child interpreter (``onnx.load`` with its
external data, ``onnx.numpy_helper``, ``json.loads`` of the stored report, or a reader that
follows the external-data spec literally), which must misbehave (a raw ``ValueError`` /
``KeyError`` / ``DecodeError`` / ``RecursionError``, or bytes read from a file the entry does
not name) and write the canary. Then ``tk`` ``describe`` and ``torchkeep inspect`` run on the
same file: the library raises torchkeep's own typed error naming the file and the field, and
the CLI exits 2 (or 0 with a note, for a bad report) without a traceback.

onnx >= 1.16 refuses ``../`` and absolute locations itself (a ``ValidationError``), so for those
the proof uses the spec-literal reader every older onnx and many tools implement.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import torchkeep as tk
from tests._live import prove_live
from torchkeep.cli import main
from torchkeep.describe import describe

onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.onnx

SECRET = b"\x07" * 8

# Plain readers; CANARY is replaced by the canary's path, {path} by the file's.
ONNX_LOAD_CRASHES = """
import onnx
try:
    onnx.load({path})
except onnx.checker.ValidationError:
    pass
except Exception as exc:
    open(CANARY, "w").write(repr(exc))
"""
ONNX_LOAD_SUCCEEDS = """
import onnx
onnx.load({path})
open(CANARY, "w").write("read")
"""
SPEC_READER_READS_SECRET = """
import onnx, os
model = onnx.load({path}, load_external_data=False)
info = dict((e.key, e.value) for e in model.graph.initializer[0].external_data)
with open(os.path.join(os.path.dirname({path}), info["location"]), "rb") as f:
    if f.read() == SECRET:
        open(CANARY, "w").write("read outside")
"""
SPEC_READER_CRASHES = """
import onnx, os
model = onnx.load({path}, load_external_data=False)
info = dict((e.key, e.value) for e in model.graph.initializer[0].external_data)
try:
    open(os.path.join(os.path.dirname({path}), info["location"]), "rb").read()
except Exception as exc:
    open(CANARY, "w").write(repr(exc))
"""
ONNX_READERS_DISAGREE = """
import onnx
from onnx.external_data_helper import ExternalDataInfo
tensor = onnx.load({path}, load_external_data=False).graph.initializer[0]
first = [e.value for e in tensor.external_data if e.key == "location"][0]
if ExternalDataInfo(tensor).location != first:
    open(CANARY, "w").write("the last entry wins in onnx, the first in a first-match reader")
"""
TO_ARRAY_MISBEHAVES = """
import onnx
tensor = onnx.load({path}).graph.initializer[0]
try:
    onnx.numpy_helper.to_array(tensor)
    open(CANARY, "w").write("accepted a negative shape")
except Exception as exc:
    open(CANARY, "w").write(repr(exc))
"""
REPORT_CRASHES = """
import json, onnx
props = onnx.load({path}).metadata_props
stored = [p.value for p in props if p.key == "torchkeep.report"][0]
try:
    report = json.loads(stored)
    for output, diffs in report["max_diffs"].items():
        print(f"abs " + format(diffs["max_abs_diff"], ".3g"))
except Exception as exc:
    open(CANARY, "w").write(repr(exc))
"""


def _tensor(data_type: int = 1, dims: tuple[int, ...] = (2,)) -> onnx.TensorProto:
    """An inline initializer ``w`` (8 zero bytes) declaring ``data_type`` and ``dims``."""
    return onnx.TensorProto(name="w", data_type=data_type, dims=dims, raw_data=b"\0" * 8)


def _external(*entries: tuple[str, str]) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[2])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in entries:
        tensor.external_data.add(key=key, value=value)
    return tensor


def _model(weight: onnx.TensorProto | None = None, report: str | None = None) -> onnx.ModelProto:
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "hostile",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2])],
        initializer=[weight if weight is not None else _tensor()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if report is not None:
        model.metadata_props.add(key="torchkeep.report", value=report)
    return model


def _folder(tmp_path: Path) -> Path:
    """``tmp_path/model/`` with ``w.bin`` in it and ``secret.bin`` next to the folder."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"\0" * 8)
    (tmp_path / "secret.bin").write_bytes(SECRET)
    return folder


def _write(model: onnx.ModelProto) -> Callable[[Path], bytes]:
    return lambda _folder: model.SerializeToString()


def _loop(folder: Path) -> bytes:
    os.symlink("loop-b", folder / "loop-a")
    os.symlink("loop-a", folder / "loop-b")
    return _model(_external(("location", "loop-a"))).SerializeToString()


def _truncated(_folder: Path) -> bytes:
    data = _model().SerializeToString()
    return data[: len(data) // 2]


def _wrong_wire_type(_folder: Path) -> bytes:
    """ir_version (field 1, an int64) stored as a length-delimited string, then a real graph."""
    model = _model()
    model.ClearField("ir_version")
    return b"\x0a\x02AB" + model.SerializeToString()


@dataclass(frozen=True)
class Payload:
    build: Callable[[Path], bytes]  # the file's bytes (may create files in the folder)
    plain: str  # the plain reader that must misbehave
    match: str  # what torchkeep's error (or note) must say


EXTERNAL = {
    "nul-in-location": Payload(
        _write(_model(_external(("location", "w.bin\0.tmp"), ("length", "8")))),
        ONNX_LOAD_SUCCEEDS,  # onnx reads w.bin: C cuts the name at the NUL
        "'location'.*control characters",
    ),
    "non-numeric-offset": Payload(
        _write(_model(_external(("location", "w.bin"), ("offset", "abc")))),
        ONNX_LOAD_CRASHES,
        r"'offset': 'abc' is not a byte count",
    ),
    "negative-length": Payload(
        _write(_model(_external(("location", "w.bin"), ("length", "-8")))),
        ONNX_LOAD_CRASHES,
        r"'length': '-8' is not a byte count",
    ),
    "5000-digit-offset": Payload(
        _write(_model(_external(("location", "w.bin"), ("offset", "9" * 5000)))),
        ONNX_LOAD_CRASHES,
        r"'offset': '9{40}\.\.\.' is not a byte count",
    ),
    "non-ascii-digits": Payload(
        _write(_model(_external(("location", "w.bin"), ("offset", "\u0664")))),  # Arabic 4
        ONNX_LOAD_SUCCEEDS,  # int() takes any Unicode digit
        "'offset'.*is not a byte count",
    ),
    "absolute-location": Payload(
        lambda folder: _model(
            _external(("location", str(folder.parent / "secret.bin")))
        ).SerializeToString(),
        SPEC_READER_READS_SECRET,
        "outside the file's folder",
    ),
    "parent-location": Payload(
        _write(_model(_external(("location", "../secret.bin")))),
        SPEC_READER_READS_SECRET,
        "outside the file's folder",
    ),
    "symlink-loop": Payload(_loop, SPEC_READER_CRASHES, "'location'.*cannot be resolved"),
    "duplicate-location": Payload(
        _write(_model(_external(("location", "w.bin"), ("location", "../secret.bin")))),
        ONNX_READERS_DISAGREE,
        "'location': given twice",
    ),
}

CONTENT = {
    "unknown-data-type": Payload(
        _write(_model(_tensor(data_type=999))), TO_ARRAY_MISBEHAVES, "data type 999"
    ),
    "negative-dims": Payload(
        _write(_model(_tensor(dims=(-2, -1)))), TO_ARRAY_MISBEHAVES, "negative dimension"
    ),
    "rank-2000": Payload(_write(_model(_tensor(dims=(1,) * 2000))), TO_ARRAY_MISBEHAVES, "2,000"),
    "truncated": Payload(_truncated, ONNX_LOAD_CRASHES, "not a readable ONNX file"),
    "garbage": Payload(lambda _: b"\xff" * 64, ONNX_LOAD_CRASHES, "not a readable ONNX file"),
    "wrong-wire-type": Payload(
        _wrong_wire_type,
        ONNX_LOAD_SUCCEEDS,  # silently: the field becomes an unknown field, ir_version 0
        "'ir_version' is missing .or stored with the wrong",
    ),
}

REPORTS = {
    "100k-deep": Payload(
        _write(_model(report="[" * 100_000 + "]" * 100_000)), REPORT_CRASHES, "deeper than 8 levels"
    ),
    "wrong-type": Payload(
        _write(_model(report=json.dumps({"max_diffs": {"y": {"max_abs_diff": "x"}}}))),
        REPORT_CRASHES,
        "max_diffs['y']",
    ),
    "5000-digit-int": Payload(
        _write(_model(report='{"opset": ' + "9" * 5000 + "}")),
        REPORT_CRASHES,
        "5000 digits",
    ),
    "a-list": Payload(
        _write(_model(report="[1, 2]")), REPORT_CRASHES, "must be an object, not an array"
    ),
    "nan-tolerance": Payload(
        _write(_model(report='{"rtol": NaN, "max_diffs": []}')),
        REPORT_CRASHES,
        "rtol must be a finite number",
    ),
}


def _prove(payload: Payload, tmp_path: Path) -> Path:
    folder = _folder(tmp_path)
    path = folder / "hostile.onnx"
    path.write_bytes(payload.build(folder))
    canary = tmp_path / "canary"
    code = payload.plain.replace("CANARY", repr(str(canary))).replace("SECRET", repr(SECRET))
    prove_live(code, canary, path=path)
    return path


def _inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, " ".join((out + err).split())  # rich wraps long lines


@pytest.mark.parametrize("name", [*EXTERNAL, *CONTENT])
def test_hostile_onnx_is_a_typed_error(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = {**EXTERNAL, **CONTENT}[name]
    path = _prove(payload, tmp_path)
    with pytest.raises(tk.CorruptFileError, match=payload.match) as info:
        describe(path)
    assert str(path) in str(info.value)
    code, output = _inspect(path, capsys)
    assert code == 2
    assert "unexpected" not in output  # torchkeep's own refusal, not the guard's
    assert str(path) in output


@pytest.mark.parametrize("name", REPORTS)
def test_hostile_report_is_named_and_not_shown(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = REPORTS[name]
    path = _prove(payload, tmp_path)
    description = describe(path)
    assert "verification" not in description.sections
    assert any("stored export report" in note for note in description.notes)
    assert any(payload.match in note for note in description.notes), description.notes
    code, output = _inspect(path, capsys)
    assert code == 0
    assert "stored export report" in output


def test_duplicate_report_entries_show_neither(tmp_path: Path) -> None:
    model = _model(report=json.dumps({"opset": 17}))
    model.metadata_props.add(key="torchkeep.report", value=json.dumps({"opset": 99}))
    path = tmp_path / "twice.onnx"
    path.write_bytes(model.SerializeToString())
    assert [p.value for p in onnx.load(str(path)).metadata_props][-1] == '{"opset": 99}'
    description = describe(path)
    assert "verification" not in description.sections
    assert any("2 entries named 'torchkeep.report'" in note for note in description.notes)


def test_a_valid_report_is_shown(tmp_path: Path) -> None:
    report = {"opset": 17, "verified_batch_sizes": [1, 2], "rtol": 1e-3, "atol": 1e-5}
    report["max_diffs"] = {"y": {"max_abs_diff": 0.5, "max_rel_diff": float("nan")}}
    path = tmp_path / "ok.onnx"
    path.write_bytes(_model(report=json.dumps(report)).SerializeToString())
    rows = dict(describe(path).sections["verification"])
    assert rows["verified batch sizes"] == "1, 2"
    assert rows["max diff y"] == "abs 0.5, rel nan"
