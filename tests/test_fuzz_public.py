"""The public API over hostile inputs raises only torchkeep's typed errors.

The contract: a bad *file* (its bytes, its documents, its kind: empty, a folder, a pipe, a
symlink loop) or a bad *path value* gives a :class:`~torchkeep.TorchkeepError` subclass; a wrong
*type* from the caller (``load_state_dict(5)``) may give ``TypeError``; ``KeyboardInterrupt``
always passes through. Hypothesis draws files with real magic prefixes and mutated samples of
every format, and bundles/checkpoints with one document field replaced (the manifest rehashed so
the edit reaches validation); the fixed cases below cover the special kinds of path.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep as tk
from tests._fuzz import document_edit, hostile_path, make_bundle, make_checkpoint
from torchkeep.compare import diff_files
from torchkeep.convert import convert
from torchkeep.describe import describe
from torchkeep.models import Net
from torchkeep.onnx.describe import _report_rows
from torchkeep.onnx.stored_report import SCHEMA, parse_stored_report
from torchkeep.schema import validate


def _output(path: object) -> Path:
    """Where a converting reader writes: next to its input (a fresh folder per example)."""
    return Path(os.fspath(path)).parent if isinstance(path, (str, Path)) else Path(".")


def _restore(path: Path) -> object:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return tk.CheckpointManager(path).restore(model=model, optimizer=optimizer)


READERS: dict[str, Callable[[Path], object]] = {
    "load_state_dict": tk.load_state_dict,
    "load_weights": lambda path: tk.load_weights(Net(), path),
    "load_model": tk.load_model,
    "load_pickled_model": tk.load_pickled_model,
    "scan": tk.scan,
    "verify": tk.verify,
    "describe": describe,
    "steps": lambda path: tk.CheckpointManager(path).steps,
    "restore": _restore,
    "diff_files": lambda path: diff_files(path, path),
    "convert": lambda path: convert(path, _output(path) / "converted.safetensors"),
    "migrate_pickled_model": lambda path: tk.migrate_pickled_model(path, _output(path) / "m"),
}
"""Every public function (and the library calls behind the CLI) that reads a path."""


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("fuzz-samples")
    return make_bundle(folder), make_checkpoint(folder)


def _leaks(reason: str, *errors: type[BaseException]) -> pytest.MarkDecorator:
    """Known leaks in modules this branch does not own: only these raw errors are tolerated."""
    return pytest.mark.xfail(reason=reason, raises=errors, strict=False)


_NOT_RESTORE = tuple(name for name in sorted(READERS) if name != "restore")


@pytest.mark.parametrize(
    ("kind", "readers"),
    [
        pytest.param("file", tuple(sorted(READERS)), id="file"),
        pytest.param("bundle", tuple(sorted(READERS)), id="bundle"),
        pytest.param("checkpoint", _NOT_RESTORE, id="checkpoint"),
        pytest.param(
            "checkpoint",
            ("restore",),
            id="checkpoint-restore",
        ),
    ],
)
@settings(
    max_examples=30,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
@pytest.mark.filterwarnings("ignore:checkpoint step:UserWarning")  # fuzzed steps are skipped
def test_readers_raise_only_typed_errors(
    kind: str, readers: tuple[str, ...], samples: tuple[Path, Path], data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(readers), label="reader")
    kinds = ("checkpoint", "step") if kind == "checkpoint" else (kind,)
    with tempfile.TemporaryDirectory() as folder:
        path = data.draw(hostile_path(Path(folder), *samples, kinds), label="input")
        with contextlib.suppress(tk.TorchkeepError):
            READERS[name](path)


def _special_paths(folder: Path) -> dict[str, Any]:
    (folder / "empty.pt").write_bytes(b"")
    (folder / "a-folder").mkdir()
    os.mkfifo(folder / "fifo.safetensors")
    os.symlink("loop-b", folder / "loop-a")
    os.symlink("loop-a", folder / "loop-b")
    os.symlink("nowhere", folder / "dangling.pt")
    return {
        "empty": folder / "empty.pt",
        "directory": folder / "a-folder",
        "fifo": folder / "fifo.safetensors",
        "symlink-loop": folder / "loop-a",
        "dangling-symlink": folder / "dangling.pt",
        "missing": folder / "missing.pt",
        "nul-in-path": str(folder / "a\0b.pt"),
        "name-too-long": str(folder / ("x" * 5000)),
    }


SPECIAL_KINDS = [
    "empty",
    "directory",
    "fifo",
    "symlink-loop",
    "dangling-symlink",
    "missing",
    "nul-in-path",
    "name-too-long",
]


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_special_paths_are_typed_errors(tmp_path: Path, kind: str, reader: str) -> None:
    """A result (``steps`` of a missing folder is ``[]``) or a typed error; a FIFO is refused,
    not opened (opening it would block this test forever)."""
    path = _special_paths(tmp_path)[kind]
    with contextlib.suppress(tk.TorchkeepError):
        READERS[reader](path)


@pytest.mark.parametrize("reader", ["scan", "load_state_dict", "describe"])
def test_zip_member_name_that_is_not_utf8(tmp_path: Path, reader: str) -> None:
    """Found by the fuzzer: a ``torch.save`` zip with one byte of a member name overwritten."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/\u00e9.bin", b"x" * 16)
    data = bytearray(buffer.getvalue())
    local_name = data.index("\u00e9".encode())  # the first copy is the local header's
    data[local_name : local_name + 2] = b"\xfb\xfb"
    path = tmp_path / "names.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(tk.TorchkeepError):
        READERS[reader](path)


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("value", [5, None, b"/tmp/x.pt", 1.5])
def test_wrong_argument_types_are_type_errors(value: object, reader: str) -> None:
    with pytest.raises((TypeError, tk.TorchkeepError)):
        READERS[reader](value)  # type: ignore[arg-type]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("reader", sorted(READERS))
def test_unreadable_file_is_an_os_error_with_its_name(tmp_path: Path, reader: str) -> None:
    """Permission is the environment, not the input: a typed error or ``PermissionError``."""
    path = tmp_path / "locked.safetensors"
    tk.save_weights(Net(), path)
    path.chmod(0)
    with pytest.raises((tk.TorchkeepError, PermissionError)):
        READERS[reader](path)


VALID_REPORT = {
    "producer": "torchkeep 0.1.0",
    "torch_version": "2.5.0",
    "exporter": "dynamo",
    "fallback_reason": None,
    "opset": 18,
    "inputs": ["input"],
    "outputs": ["output"],
    "dynamic_batch": True,
    "export_batch_size": 2,
    "verified_batch_sizes": [1, 2, 7],
    "rtol": 1e-3,
    "atol": 1e-5,
    "max_diffs": {"output": {"max_abs_diff": 1e-6, "max_rel_diff": 2e-6}},
}


@settings(max_examples=80, deadline=None)
@given(text=st.one_of(document_edit(VALID_REPORT).map(json.dumps), st.text(max_size=64)))
def test_stored_onnx_report_is_valid_or_a_typed_error(text: str) -> None:
    """The export report in an ``.onnx`` file: every field checked, or the report refused."""
    path = Path("net.onnx")
    try:
        stored = parse_stored_report(text, path=path)
    except tk.CorruptFileError as exc:
        refusal = str(exc)
    else:
        assert set(stored) <= set(SCHEMA.fields)
        validate(stored, SCHEMA, source=str(path))
        _report_rows(text, path)  # what inspect shows: formats every validated field
        return
    assert "net.onnx: the stored export report" in refusal
