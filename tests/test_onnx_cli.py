"""``torchkeep export-onnx`` and inspecting the files it writes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from tests._compat import skip_unless_dynamo_onnx
from torchkeep.cli import main
from torchkeep.describe import describe
from torchkeep.formats import Format
from torchkeep.models import Net

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.onnx


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Net, str]:
    """``export-onnx torchkeep.models:Net --weights ...`` run once; its file, model and output."""
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(3)
    model = Net()
    weights = tk.save_weights(model, folder / "net.safetensors")
    out = folder / "net.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["export-onnx", "torchkeep.models:Net", "--weights", str(weights), "-o", str(out),
             "--input-shape", "1,3,32,32"]
        )  # fmt: skip
    assert code == 0
    return out, model, printed.getvalue()


def test_export_prints_the_verification_table(cli_export: tuple[Path, Net, str]) -> None:
    _, _, printed = cli_export
    skip_unless_dynamo_onnx()
    assert "max abs diff" in printed
    assert "max rel diff" in printed
    assert "dynamo exporter, dynamic batch" in " ".join(printed.split())  # rich wraps lines
    assert sum(line.count("yes") for line in printed.splitlines()) == 3  # batch 1, 2 and 7


def test_export_uses_the_weights_file(cli_export: tuple[Path, Net, str]) -> None:
    path, model, _ = cli_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    actual = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(actual, expected)


def test_describe_shows_signature_ops_and_stored_report(cli_export: tuple[Path, Net, str]) -> None:
    path, model, _ = cli_export
    skip_unless_dynamo_onnx()
    description = describe(path)
    assert description.format is Format.ONNX
    assert description.sections["inputs"] == [("input", "float[batch, 3, 32, 32]")]
    assert description.sections["outputs"] == [("output", "float[batch, 10]")]
    ops = dict(description.sections["ops"])
    assert ops["Conv"] == "2"
    assert ops["MaxPool"] == "2"
    model_rows = dict(description.sections["model"])
    assert model_rows["dynamic batch"] == "yes"
    assert int(model_rows["opset"]) >= 18
    verification = dict(description.sections["verification"])
    assert verification["verified batch sizes"] == "1, 2, 7"
    assert verification["torch version"] == torch.__version__
    assert verification["max diff output"].startswith("abs ")
    tensors = {t.name: t for t in description.tensors}
    assert tensors["conv1.weight"].shape == (6, 3, 5, 5)
    assert tensors["conv1.weight"].dtype == "float"
    assert tensors["fc1.weight"].nbytes == model.fc1.weight.numel() * 4
    assert description.size == path.stat().st_size
    json.dumps(description.to_json())


def test_inspect_command_on_an_onnx_file(
    cli_export: tuple[Path, Net, str], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torchkeep.cli.inspect", reason="the inspect command is another issue")
    path, _, _ = cli_export
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "batch, 3, 32, 32" in out
    assert "1, 2, 7" in out


def test_two_inputs_unverified_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "two.onnx"
    code = main(
        ["export-onnx", "tests.test_onnx:TwoInTwoOut", "-o", str(out), "--input-shape", "2,4",
         "--input-shape", "2,6", "--no-verify", "--static-batch", "--json"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == ["input_0", "input_1"]
    assert report["outputs"] == ["output_0", "output_1"]
    assert report["verified"] is False
    assert report["dynamic_batch"] is False
    assert report["diffs"] == []
    assert report["size"] == out.stat().st_size


def test_wrong_numbers_exit_1_with_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    skip_unless_dynamo_onnx()
    out = tmp_path / "liar.onnx"
    code = main(
        ["export-onnx", "tests.test_onnx:ExportOnlyOffset", "-o", str(out), "--input-shape", "2,4"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "max abs diff" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no_such_module_xyz:Model"], "cannot import"),
        (["torchkeep.models:NoSuchClass"], "cannot import"),
        (["torchkeep.models"], "module:Class"),
    ],
)
def test_bad_sources_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    args = ["export-onnx", *argv, "-o", str(tmp_path / "m.onnx"), "--input-shape", "1,4"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", ["", "1,x", "0,3", "1,3:notadtype"])
def test_bad_input_shape_is_a_usage_error(tmp_path: Path, shape: str) -> None:
    args = ["export-onnx", "torchkeep.models:Net", "-o", str(tmp_path / "m.onnx")]
    with pytest.raises(SystemExit) as info:
        main([*args, "--input-shape", shape])
    assert info.value.code == 2


def test_export_of_a_bundle_defaults_to_its_example_input_shapes(
    net_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export-onnx", str(net_bundle), "-o", str(out), "--json"]) == 0
    model = tk.load_model(net_bundle)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(
        torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), expected
    )


def test_export_without_known_shapes_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tk.save_model(Net(), tmp_path / "plain.bundle")  # no example inputs recorded
    assert main(["export-onnx", str(bundle), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
