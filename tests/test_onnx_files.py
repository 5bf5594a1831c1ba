"""ONNX files on disk: external data round trips, missing or hostile data files are refused."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.describe import describe
from torchkeep.models import Net
from torchkeep.onnx import files
from torchkeep.onnx.files import commit, is_data_file_name, load_model, save_staged
from torchkeep.onnx.verification import verify_file

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.onnx


def _tiny_model(location: str | None = None, size: int = 4) -> onnx.ModelProto:
    """``y = x + w`` with ``w`` (1, 2, ... size) inline, or in external data at ``location``."""
    helper = onnx.helper
    values = torch.arange(1.0, size + 1).numpy().tobytes()
    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [size], values, raw=True)
    if location is not None:
        weight.ClearField("raw_data")
        weight.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(4 * size))):
            weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", size])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> tuple[Net, tk.OnnxReport]:
    torch.manual_seed(0)
    model = Net()
    path = tmp_path_factory.mktemp("external") / "net.onnx"
    return model, tk.export_onnx(model, torch.randn(1, 3, 32, 32), path, external_data_threshold=0)


def test_threshold_forces_external_data_that_round_trips(
    external: tuple[Net, tk.OnnxReport],
) -> None:
    model, report = external
    assert report.ok
    [name] = report.external_data
    assert is_data_file_name(report.path, name)
    assert sorted(p.name for p in report.path.parent.iterdir()) == ["net.onnx", name]
    data = report.path.parent / name
    assert report.size == report.path.stat().st_size + data.stat().st_size
    assert report.path.stat().st_size < data.stat().st_size  # the weights left the .onnx
    stored = onnx.load(str(report.path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)
    assert "torchkeep.report" in {p.key for p in stored.metadata_props}
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    actual = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(actual, expected)
    assert describe(report.path).sections["model"][-1] == ("external data", name)


def test_missing_external_data_file_is_named(
    external: tuple[Net, tk.OnnxReport], tmp_path: Path
) -> None:
    model, report = external
    moved = tmp_path / "net.onnx"
    shutil.copy(report.path, moved)  # the data file stays behind
    name = re.escape(report.external_data[0])
    with pytest.raises(tk.TorchkeepFileNotFoundError, match=rf"'{name}'.*missing"):
        describe(moved)
    with pytest.raises(FileNotFoundError, match="copy both files together"):
        verify_file(
            moved, model, (torch.randn(1, 3, 32, 32),), input_names=["input"],
            output_names=["output"], batch_sizes=(1,), rtol=1e-3, atol=1e-5,
        )  # fmt: skip


def test_truncated_external_data_file_is_corrupt(
    external: tuple[Net, tk.OnnxReport], tmp_path: Path
) -> None:
    _, report = external
    shutil.copy(report.path, tmp_path / "net.onnx")
    [name] = report.external_data
    data = (report.path.parent / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(tk.CorruptFileError, match="truncated"):
        load_model(tmp_path / "net.onnx")


def _hostile_locations(tmp_path: Path) -> dict[str, str]:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(b"\0" * 16)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    os.symlink(secret, model_dir / "link.bin")
    return {
        "parent": "../outside/secret.bin",
        "nested-parent": "sub/../../outside/secret.bin",
        "absolute": str(secret),
        "symlink": "link.bin",
    }


@pytest.mark.parametrize("kind", ["parent", "nested-parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, kind: str) -> None:
    location = _hostile_locations(tmp_path)[kind]
    path = tmp_path / "model" / "hostile.onnx"
    onnx.save_model(_tiny_model(location), str(path))
    for reader in (load_model, describe):
        with pytest.raises(tk.CorruptFileError, match="outside") as info:
            reader(path)
        assert location in str(info.value)
    with pytest.raises(tk.CorruptFileError, match="outside"):
        verify_file(
            path, torch.nn.Identity(), (torch.randn(1, 4),), input_names=["x"],
            output_names=["y"], batch_sizes=(1,), rtol=1e-3, atol=1e-5,
        )  # fmt: skip


def test_inside_location_is_read(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(torch.arange(1.0, 5.0).numpy().tobytes())
    onnx.save_model(_tiny_model("sub/w.bin"), str(tmp_path / "ok.onnx"))
    model = load_model(tmp_path / "ok.onnx", with_data=True)
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).tolist() == [1, 2, 3, 4]


def test_not_an_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(tk.FileFormatError, match="not a readable ONNX file"):
        describe(path)


def _values(size: int, start: float = 1.0) -> onnx.ModelProto:
    """A tiny model whose weight is ``start, start + 1, ...`` (``size`` of them)."""
    model = _tiny_model(size=size)
    values = torch.arange(start, start + size).numpy().tobytes()
    model.graph.initializer[0].raw_data = values
    return model


def _commit(tmp_path: Path, final: Path, model: onnx.ModelProto, *, external: bool) -> list[str]:
    """Stage ``model`` next to ``final`` the way export_onnx does, then commit it."""
    with files.staging_folder(final) as stage:
        save_staged(model, stage / final.name, external_data=external)
        return commit(stage / final.name, final, {"k": "v"})


def _weight(final: Path) -> list[float]:
    model = load_model(final, with_data=True)
    return [float(v) for v in onnx.numpy_helper.to_array(model.graph.initializer[0])]


def test_commit_names_data_after_its_contents_and_drops_the_old_one(tmp_path: Path) -> None:
    final = tmp_path / "tiny.onnx"
    first = _commit(tmp_path, final, _values(1000), external=True)
    [name] = first
    assert is_data_file_name(final, name)
    again = _commit(tmp_path, final, _values(1000), external=True)
    assert again == first  # same weights, same name: nothing to replace or delete
    second = _commit(tmp_path, final, _values(1000, start=5.0), external=True)
    assert second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny.onnx", *second])
    assert _weight(final)[:2] == [5.0, 6.0]
    assert _commit(tmp_path, final, _values(1000), external=False) == []
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]  # inline now: no data left
    model = load_model(final)
    assert {p.key: p.value for p in model.metadata_props} == {"k": "v"}
    assert sum(_weight(final)) == 500500


def test_a_crash_before_the_onnx_rename_keeps_the_old_model_and_the_next_export_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "tiny.onnx"
    [old] = _commit(tmp_path, final, _values(1000), external=True)

    class Crash(Exception):
        pass

    def crash(path: Path) -> None:  # the new data file is in place, the .onnx is not
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(files, "atomic_file", crash)
        with pytest.raises(Crash):
            _commit(tmp_path, final, _values(1000, start=5.0), external=True)
    [orphan] = {p.name for p in tmp_path.iterdir()} - {"tiny.onnx", old}
    assert is_data_file_name(final, orphan)
    assert _weight(final)[:2] == [1.0, 2.0]  # the old graph still reads the old weights
    [new] = _commit(tmp_path, final, _values(1000, start=9.0), external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny.onnx", new])
    assert _weight(final)[:2] == [9.0, 10.0]


def test_an_overwrite_deletes_only_data_files_of_its_own_path(tmp_path: Path) -> None:
    final = tmp_path / "tiny.onnx"
    outside = tmp_path.parent / f"{tmp_path.name}-outside.bin"
    outside.write_bytes(b"secret")
    spared = {
        "tiny.onnx.data": b"legacy name, but the old model does not use it",
        "tiny.onnx.0123456789ABCDEF.data": b"not torchkeep's form (upper case)",
        "tiny.onnx.0123456789abcde.data": b"15 digits",
        "other.onnx.0123456789abcdef.data": b"another model's data",
        "tiny.onnx.0123456789abcdef.data.bak": b"a backup",
        "notes.txt": b"the user's",
    }
    for name, text in spared.items():
        (tmp_path / name).write_bytes(text)
    os.symlink(outside, tmp_path / "tiny.onnx.fedcba9876543210.data")  # a link is not ours
    _commit(tmp_path, final, _values(1000), external=True)
    [new] = _commit(tmp_path, final, _values(1000, start=2.0), external=True)
    for name, text in spared.items():
        assert (tmp_path / name).read_bytes() == text
    assert (tmp_path / "tiny.onnx.fedcba9876543210.data").is_symlink()
    assert outside.read_bytes() == b"secret"
    assert {p.name for p in tmp_path.iterdir()} == {
        "tiny.onnx",
        new,
        "tiny.onnx.fedcba9876543210.data",
        *spared,
    }


def test_an_overwrite_removes_the_legacy_data_file_the_old_model_used(tmp_path: Path) -> None:
    final = tmp_path / "tiny.onnx"  # as torch.onnx.export and torchkeep before 0.x wrote it
    onnx.save_model(
        _values(1000), str(final), save_as_external_data=True, location="tiny.onnx.data"
    )
    assert (tmp_path / "tiny.onnx.data").is_file()
    [new] = _commit(tmp_path, final, _values(1000, start=3.0), external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny.onnx", new])


def test_a_hostile_old_model_makes_the_overwrite_delete_nothing_it_names(tmp_path: Path) -> None:
    final = tmp_path / "tiny.onnx"
    legacy = tmp_path / "tiny.onnx.data"
    legacy.write_bytes(torch.arange(1.0, 5.0).numpy().tobytes())
    hostile = _tiny_model("tiny.onnx.data")
    weight = hostile.graph.initializer[0]
    weight.external_data.add(key="location", value="../x")  # given twice: refused
    onnx.save_model(hostile, str(final))
    with pytest.raises(tk.CorruptFileError, match="given twice"):
        load_model(final)
    [new] = _commit(tmp_path, final, _values(1000), external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["tiny.onnx", "tiny.onnx.data", new]
    )


def test_commit_holds_the_folder_lock_while_it_moves_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    seen = []
    real = files.fsync_dir

    def probe(path: Path) -> None:  # called between the data rename and the .onnx rename
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(path)
        finally:
            os.close(fd)
        real(path)

    monkeypatch.setattr(files, "fsync_dir", probe)
    _commit(tmp_path, tmp_path / "tiny.onnx", _values(1000), external=True)
    assert seen == [tmp_path]
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards
    finally:
        os.close(fd)
