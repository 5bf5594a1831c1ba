"""ONNX files on disk: external data round trips, missing or hostile data files are refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.describe import describe
from torchkeep.models import Net
from torchkeep.onnx.files import commit, load_model, save_staged
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
    assert report.external_data == ["net.onnx.data"]
    data = report.path.parent / "net.onnx.data"
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
    assert describe(report.path).sections["model"][-1] == ("external data", "net.onnx.data")


def test_missing_external_data_file_is_named(
    external: tuple[Net, tk.OnnxReport], tmp_path: Path
) -> None:
    model, report = external
    moved = tmp_path / "net.onnx"
    shutil.copy(report.path, moved)  # the data file stays behind
    with pytest.raises(tk.TorchkeepFileNotFoundError, match=r"'net\.onnx\.data'.*missing"):
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
    data = (report.path.parent / "net.onnx.data").read_bytes()
    (tmp_path / "net.onnx.data").write_bytes(data[: len(data) // 2])
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


def test_commit_moves_data_first_and_drops_a_stale_data_file(tmp_path: Path) -> None:
    final = tmp_path / "tiny.onnx"
    for external in (True, False):
        stage = tmp_path / f"stage-{external}"
        stage.mkdir()
        save_staged(_tiny_model(size=1000), stage / final.name, external_data=external)
        names = commit(stage / final.name, final, {"k": str(external)})
        assert names == (["tiny.onnx.data"] if external else [])
        assert (tmp_path / "tiny.onnx.data").exists() == external
        model = load_model(final, with_data=True)
        assert {p.key: p.value for p in model.metadata_props} == {"k": str(external)}
        assert onnx.numpy_helper.to_array(model.graph.initializer[0]).sum() == 500500
