"""Paths no file can have, and files that are not regular files where a document should be.

``pathlib`` answers "missing" for some lookups and raises a raw ``OSError``/``ValueError`` for
others; each test first shows the plain call failing that way, then that torchkeep's public
functions give a typed error naming the path instead, and write nothing.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.convert import convert
from torchkeep.errors import InvalidDocumentError, UnreadableFileError
from torchkeep.formats import Format, detect_format
from torchkeep.manifest import MANIFEST_NAME, declared_format
from torchkeep.model.config import read_config, validate_config
from torchkeep.models import Net
from torchkeep.paths import lookup
from torchkeep.schema import load_json_document

TOO_LONG = "x" * 5000


def _impossible(folder: Path) -> dict[str, str]:
    return {
        "name too long": str(folder / TOO_LONG),
        "folder name too long": str(folder / TOO_LONG / "net.safetensors"),
        "NUL": str(folder / "a\0b.safetensors"),
    }


def _plain_lookup_raises(path: str) -> None:
    """The plain calls torchkeep replaces really fail with a raw error on ``path``."""
    with pytest.raises((OSError, ValueError)) as info:
        open(path, "xb").close()
    assert not isinstance(info.value, tk.TorchkeepError)
    if "\0" not in path:
        with pytest.raises(OSError, match="too long") as lookup_info:
            Path(path).exists()
        assert lookup_info.value.errno == errno.ENAMETOOLONG


WRITERS: dict[str, Callable[[str], object]] = {
    "save_weights": lambda path: tk.save_weights(Net(), path),
    "save_model": lambda path: tk.save_model(Net(), path),
    "CheckpointManager.save": lambda path: tk.CheckpointManager(path).save(1, model=Net()),
    "export_onnx": lambda path: tk.export_onnx(Net(), torch.randn(1, 3, 32, 32), path),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("case", ["name too long", "folder name too long", "NUL"])
def test_writers_refuse_a_path_no_file_can_have(case: str, writer: str, tmp_path: Path) -> None:
    path = _impossible(tmp_path)[case]
    _plain_lookup_raises(path)
    with pytest.raises(tk.TorchkeepError) as info:
        WRITERS[writer](path)
    if not isinstance(info.value, tk.MissingDependencyError):  # export_onnx without onnx
        assert isinstance(info.value, tk.TorchkeepFileNotFoundError)
        assert str(tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing staged, nothing left behind


@pytest.mark.parametrize("case", ["name too long", "folder name too long", "NUL"])
def test_convert_refuses_a_destination_no_file_can_have(case: str, tmp_path: Path) -> None:
    source = tk.save_weights(Net(), tmp_path / "net.safetensors")
    path = _impossible(tmp_path / "out")[case]
    with pytest.raises(tk.TorchkeepFileNotFoundError, match="check the path"):
        convert(source, path)
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]


@pytest.mark.parametrize("case", ["name too long", "folder name too long", "NUL"])
def test_readers_refuse_a_path_no_file_can_have(case: str, tmp_path: Path) -> None:
    path = _impossible(tmp_path)[case]
    _plain_lookup_raises(path)
    with pytest.raises(tk.TorchkeepFileNotFoundError, match="check the path"):
        tk.load_weights(Net(), path)
    with pytest.raises(tk.TorchkeepFileNotFoundError, match="check the path"):
        tk.load_state_dict(path)
    with pytest.raises(tk.TorchkeepFileNotFoundError, match="check the path"):
        tk.load_model(path)
    with pytest.raises(tk.TorchkeepFileNotFoundError, match="check the path"):
        tk.verify(path)
    with pytest.raises(tk.TorchkeepFileNotFoundError, match="check the path"):
        tk.CheckpointManager(path).steps  # noqa: B018 - the property reads the folder


def test_lookup_reports_absent_paths_as_none(tmp_path: Path) -> None:
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    os.symlink("nowhere", tmp_path / "dangling")
    (tmp_path / "file").write_bytes(b"x")
    for name in ("missing", "loop-a", "dangling", "file/below"):
        assert lookup(tmp_path / name) is None, name
    assert lookup(tmp_path / "file") is not None
    assert tk.CheckpointManager(tmp_path / "missing").steps == []


# ---- a FIFO where a JSON document should be -------------------------------------------------


def test_a_fifo_in_place_of_a_document_is_refused_without_blocking(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: torchkeep opens documents
    non-blocking and refuses anything but a regular file before reading a byte."""
    fifo = tmp_path / "doc.json"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableFileError, match="not a regular file"):
        load_json_document(fifo)


def test_a_fifo_manifest_makes_a_folder_of_unknown_kind(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / MANIFEST_NAME)
    assert declared_format(folder) is None
    assert detect_format(folder) == Format.UNKNOWN


def test_a_fifo_config_is_a_typed_error(tmp_path: Path) -> None:
    bundle = tk.save_model(Net(), tmp_path / "net")
    (bundle / "config.json").unlink()
    os.mkfifo(bundle / "config.json")
    with pytest.raises(UnreadableFileError, match=r"config\.json is not a regular file"):
        read_config(bundle)


# ---- dtype names come from a fixed table, never getattr(torch, name) ---------------------


def _config(dtype: object) -> dict[str, object]:
    return {
        "class": "torchkeep.models.Net",
        "init": {},
        "example_inputs": [{"shape": [2, 3], "dtype": dtype}],
    }


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("float32", torch.float32),
        ("float", torch.float32),
        ("int64", torch.int64),
        ("bool", torch.bool),
    ],
)
def test_example_inputs_come_back_as_torch_dtypes(name: str, dtype: torch.dtype) -> None:
    config = validate_config(_config(name), Path("config.json"))
    assert config.example_inputs == [([2, 3], dtype)]


@pytest.mark.parametrize("name", ["save", "load", "Tensor", "__class__", "float32 ", "", 5, None])
def test_a_dtype_name_that_is_not_a_dtype_is_refused(name: object) -> None:
    """``getattr(torch, "save")`` is a function: such names never reach torch."""
    with pytest.raises(InvalidDocumentError, match=r"example_inputs\[0\]\.dtype"):
        validate_config(_config(name), Path("config.json"))


def test_verify_names_a_fifo_in_place_of_a_listed_file(tmp_path: Path) -> None:
    bundle = tk.save_model(Net(), tmp_path / "net")
    (bundle / "config.json").unlink()
    os.mkfifo(bundle / "config.json")
    report = tk.verify(bundle)
    assert not report.ok
    assert any("config.json is not a regular file" in p for p in report.problems), report.problems
