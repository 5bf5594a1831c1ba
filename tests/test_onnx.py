"""export_onnx on real models: dynamic batch proven at 1, 2 and 7, errors that say what to do."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests._compat import custom_op, skip_unless_dynamo_onnx
from torchkeep.models import Net, small_vgg

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.onnx


class TwoInTwoOut(nn.Module):
    """Two inputs of different widths, two outputs of different shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.a(a) + self.b(b)
        return hidden.relu(), (hidden * a[:, :3]).sum(dim=1)


class ExportOnlyOffset(nn.Module):
    """Gives different numbers once exported: what verification exists to catch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.fc(x)
        if torch.compiler.is_exporting():
            y = y + 0.1
        return y


class BranchOnValue(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x - 1


@custom_op("torchkeep_tests::opaque")
def opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class UsesOpaqueOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return opaque(x) + 1


def _bn_dropout() -> nn.Module:
    """Batch norm with non-trivial running statistics and dropout, left in training mode."""
    torch.manual_seed(1)
    model = small_vgg(batch_norm=True)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.train()


@dataclass
class Exported:
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    report: tk.OnnxReport
    was_training: bool


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]]]] = {
    "net": (Net, lambda: (torch.randn(1, 3, 32, 32),)),  # batch 1: the specialisation trap
    "vgg": (small_vgg, lambda: (torch.randn(2, 3, 32, 32),)),
    "two_in_two_out": (TwoInTwoOut, lambda: (torch.randn(2, 4), torch.randn(2, 6))),
    "bn_dropout": (_bn_dropout, lambda: (torch.randn(2, 3, 32, 32),)),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    build, example = CASES[request.param]
    torch.manual_seed(0)
    model, inputs = build(), example()
    was_training = model.training
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    report = tk.export_onnx(model, inputs, path)
    return Exported(model, inputs, report, was_training)


def _run(path: Path, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = session.run(None, {name: x.numpy() for name, x in feeds.items()})
    return [torch.from_numpy(r) for r in results]


def test_export_is_verified_at_batch_sizes_1_2_and_7(exported: Exported) -> None:
    skip_unless_dynamo_onnx()
    report = exported.report
    assert report.exporter == "dynamo"
    assert report.fallback_reason is None
    assert report.ok
    assert report.batch_sizes == (1, 2, 7)
    assert {(d.batch_size, d.output) for d in report.diffs} == {
        (b, name) for b in (1, 2, 7) for name in report.outputs
    }
    assert all(d.max_abs_diff <= 1e-4 for d in report.diffs)
    assert report.path.is_file()
    assert report.size == report.path.stat().st_size
    assert not [p for p in report.path.parent.iterdir() if p.name.startswith(".")]


def test_file_matches_eager_model_at_an_unverified_batch_size(exported: Exported) -> None:
    """Independent of torchkeep's own verification: run the file at batch 5 ourselves."""
    model = copy.deepcopy(exported.model).eval()
    inputs = [torch.randn(5, *x.shape[1:]) for x in exported.inputs]
    outputs = _run(exported.report.path, dict(zip(exported.report.inputs, inputs, strict=True)))
    with torch.no_grad():
        expected = model(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for actual, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-3, atol=1e-5)


def test_every_input_has_a_symbolic_batch_dimension(exported: Exported) -> None:
    graph = onnx.load(str(exported.report.path)).graph
    assert [value.name for value in graph.input] == exported.report.inputs
    for value in graph.input:
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param, value.name
        assert not first.HasField("dim_value"), value.name
    assert exported.report.dynamic_batch


def test_model_modes_are_restored(exported: Exported) -> None:
    assert exported.model.training == exported.was_training


class Mixed(nn.Module):
    """Batch norm and dropout: layers whose output differs between train and eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.inner = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.drop(self.norm(self.fc(x))))


MODE_SETUPS: dict[str, Callable[[nn.Module], None]] = {
    "all_eval": lambda m: m.eval(),
    "all_train": lambda m: m.train(),
    "top_eval_submodules_train": lambda m: (m.eval(), m.norm.train(), m.inner.train()),
    "top_train_one_eval": lambda m: (m.train(), m.drop.eval()),
}


@pytest.mark.parametrize("setup", list(MODE_SETUPS))
def test_every_submodule_is_in_eval_during_export_and_each_mode_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: str
) -> None:
    torch.manual_seed(0)
    model = Mixed()
    MODE_SETUPS[setup](model)
    before = {name: m.training for name, m in model.named_modules()}
    during: list[dict[str, bool]] = []
    real_export = torch.onnx.export

    def spy(module: nn.Module, *args: object, **kwargs: object) -> object:
        during.append({name: m.training for name, m in module.named_modules()})
        return real_export(module, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.onnx, "export", spy)
    tk.export_onnx(model, (torch.randn(2, 8),), tmp_path / "mixed.onnx", verify=False)
    assert during, "torch.onnx.export was not called"
    for modes in during:
        assert not any(modes.values()), f"in train mode during export: {modes}"
    assert {name: m.training for name, m in model.named_modules()} == before


def test_report_is_stored_in_the_file_metadata(exported: Exported) -> None:
    skip_unless_dynamo_onnx()
    props = {p.key: p.value for p in onnx.load(str(exported.report.path)).metadata_props}
    stored = json.loads(props["torchkeep.report"])
    assert stored["producer"] == f"torchkeep {tk.__version__}"
    assert stored["torch_version"] == torch.__version__
    assert stored["opset"] == exported.report.opset >= 18
    assert stored["verified_batch_sizes"] == [1, 2, 7]
    assert set(stored["max_diffs"]) == set(exported.report.outputs)
    assert stored["max_diffs"] == exported.report.max_diffs()


def test_batch_one_example_is_exported_at_batch_two() -> None:
    # the "net" case's example has batch 1; recheck the plan without exporting again
    from torchkeep.onnx.exporter import _batch_plan

    traced, shapes, batch = _batch_plan((torch.randn(1, 3, 32, 32), torch.tensor(2.0)), True)
    assert batch == 2
    assert traced[0].shape == (2, 3, 32, 32)
    assert torch.equal(traced[0][0], traced[0][1])
    assert shapes[1] is None
    assert shapes[0][0].__name__ == "batch"


def test_default_names_for_several_inputs_and_outputs(exported: Exported) -> None:
    if len(exported.inputs) == 1:
        assert exported.report.inputs == ["input"]
        assert exported.report.outputs == ["output"]
    else:
        assert exported.report.inputs == ["input_0", "input_1"]
        assert exported.report.outputs == ["output_0", "output_1"]


def test_fixed_batch_with_custom_names(tmp_path: Path, net: Net) -> None:
    x = torch.randn(3, 3, 32, 32)
    report = tk.export_onnx(
        net, x, tmp_path / "net.onnx", dynamic_batch=False, input_names=["image"],
        output_names=["logits"],
    )  # fmt: skip
    assert report.ok
    assert not report.dynamic_batch
    assert report.batch_sizes == (3,)
    graph = onnx.load(str(report.path)).graph
    assert graph.input[0].name == "image"
    assert graph.output[0].name == "logits"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3


def test_wrong_numbers_raise_and_leave_the_old_file(tmp_path: Path) -> None:
    skip_unless_dynamo_onnx()
    path = tmp_path / "liar.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(tk.ExportVerificationError) as info:
        tk.export_onnx(ExportOnlyOffset(), torch.randn(2, 4), path)
    message = str(info.value)
    assert "max abs diff" in message
    assert "NO" in message
    assert "nothing was written" in message
    for batch in (1, 2, 7):
        assert f"\n{batch} " in message
    assert path.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liar.onnx"]


def test_data_dependent_control_flow_names_the_line_and_torch_cond(tmp_path: Path) -> None:
    skip_unless_dynamo_onnx()
    with pytest.raises(tk.ExportError) as info:
        tk.export_onnx(BranchOnValue(), torch.randn(2, 3), tmp_path / "branch.onnx")
    message = str(info.value)
    assert not isinstance(info.value, tk.ExportVerificationError)
    assert "data-dependent" in message
    assert "torch.cond" in message
    assert "test_onnx.py:" in message
    assert "if x.sum() > 0:" in message
    assert len(message) < 1000
    assert info.value.__cause__ is not None
    assert list(tmp_path.iterdir()) == []


def test_op_without_onnx_translation_names_the_op(tmp_path: Path) -> None:
    skip_unless_dynamo_onnx()
    with pytest.raises(tk.ExportError) as info:
        tk.export_onnx(UsesOpaqueOp(), torch.randn(2, 3), tmp_path / "opaque.onnx")
    message = str(info.value)
    assert "torchkeep_tests::opaque" in message
    assert "custom_translation_table" in message
    assert "torch.ops.torchkeep_tests.opaque.default" in message
    assert info.value.__cause__ is not None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_dependency_gives_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, package: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # what a failed import looks like
    with pytest.raises(tk.MissingDependencyError) as info:
        tk.export_onnx(Net(), torch.randn(1, 3, 32, 32), tmp_path / "net.onnx")
    assert isinstance(info.value, ImportError)
    assert package in str(info.value)
    assert "pip install 'torchkeep[onnx]'" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_example_inputs_and_names_are_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(tk.ExportError, match="tuple of tensors"):
        tk.export_onnx(Net(), [[1.0]], tmp_path / "a.onnx")  # type: ignore[arg-type]
    with pytest.raises(tk.ExportError, match="output_names"):
        tk.export_onnx(Net(), torch.randn(1, 3, 32, 32), tmp_path / "b.onnx", output_names=[])
    with pytest.raises(tk.ExportError, match="share its first dimension"):
        tk.export_onnx(TwoInTwoOut(), (torch.randn(2, 4), torch.randn(3, 6)), tmp_path / "c.onnx")
    assert list(tmp_path.iterdir()) == []


def test_torchscript_fallback_is_reported_and_verified(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, net: Net
) -> None:
    from torchkeep.onnx import exporter

    def dynamo_fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(exporter, "_export_dynamo", dynamo_fails)
    monkeypatch.setattr(exporter, "onnx_dynamo_export_available", lambda: True)  # torch 2.4 too
    report = tk.export_onnx(net, torch.randn(1, 3, 32, 32), tmp_path / "net.onnx")
    assert report.exporter == "torchscript"
    assert report.fallback_reason is not None
    assert "simulated dynamo failure" in report.fallback_reason
    assert report.ok
    assert report.batch_sizes == (1, 2, 7)
    props = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    stored = json.loads(props["torchkeep.report"])
    assert stored["exporter"] == "torchscript"
