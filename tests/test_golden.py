"""Files written by earlier torchkeep releases still load, bit for bit, with exact resume."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import torchkeep as tk
from tests._compat import skip_unless_programs_load
from tests.conftest import assert_state_equal
from tests.golden.model import INPUT, GoldenNet, optimizer_tensors, records
from torchkeep import compat

GOLDEN = Path(__file__).parent / "golden"


def test_a_torchkeep_0_1_0_step_restores_exactly(tmp_path: Path) -> None:
    """0.1.0 stored the generator states as the entry ``rng``: they are still applied."""
    source = GOLDEN / "torchkeep-0.1.0"
    shutil.copytree(source / "ckpt", tmp_path / "ckpt")
    assert tk.verify(tmp_path / "ckpt").ok
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    restored = tk.CheckpointManager(tmp_path / "ckpt").restore(model=model, optimizer=optimizer)
    assert (restored.step, restored.extra) == (7, {"epoch": 3})
    step = source / "ckpt" / "step-00000007"
    assert_state_equal(model.state_dict(), load_file(step / "model.safetensors"))
    stored_momentum = load_file(step / "optimizer.safetensors")["state[0].momentum_buffer"]
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], stored_momentum)
    expected = json.loads((source / "expected_after_resume.json").read_text())
    assert torch.rand(4).tolist() == expected["torch"]
    assert random.random() == expected["python"]
    assert float(np.random.rand()) == expected["numpy"]


# --------------------------------------------------------------------------------------------
# Every format this torchkeep writes, written under each torch of the tested range
# (tests/golden/make_golden.py): every run, under every torch, loads every artifact of every
# set and checks every value, so files written under the oldest torch load under the newest
# and back.

SETS = sorted(GOLDEN.glob("format-v1-torch-*"))


def _expected(golden: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((golden / "expected.json").read_text())
    return data


def _records(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[Any]]:
    return records(dict(tensors))


def test_every_golden_set_is_present_and_small() -> None:
    """One set per end of the tested range at least, each a few hundred KB at most."""
    names = {golden.name for golden in SETS}
    assert {"format-v1-torch-2.4.1", "format-v1-torch-2.13.0"} <= names
    for golden in SETS:
        size = sum(f.stat().st_size for f in golden.rglob("*") if f.is_file())
        assert size < 256 * 1024, f"{golden} holds {size} bytes"


@pytest.mark.parametrize("golden", SETS, ids=lambda p: p.name)
@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pt"])
def test_golden_weights_load_bit_for_bit(golden: Path, name: str) -> None:
    expected = _expected(golden)
    state = tk.load_state_dict(golden / name)
    assert _records(state) == expected["weights"]
    for alias, target in expected["tied"].items():  # stored once, restored tied
        assert state[alias].data_ptr() == state[target].data_ptr()
    model = GoldenNet()
    report = tk.load_weights(model, golden / name, strict=False)
    assert sorted(report.unexpected) == sorted(
        k for k in expected["weights"] if k not in expected["model"]
    )
    assert _records(model.state_dict()) == expected["model"]
    assert tk.scan(golden / name).is_safe


@pytest.mark.parametrize("golden", SETS, ids=lambda p: p.name)
@pytest.mark.parametrize("bundle", ["net.bundle", "program.bundle"])
def test_golden_bundles_load_and_compute_the_recorded_outputs(golden: Path, bundle: str) -> None:
    expected = _expected(golden)
    assert tk.verify(golden / bundle).ok
    model = tk.load_model(golden / bundle)
    assert isinstance(model, GoldenNet)
    assert _records(model.state_dict()) == expected["model"]
    with torch.no_grad():
        outputs = model(torch.tensor(INPUT))
    torch.testing.assert_close(outputs, torch.tensor(expected["outputs"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("golden", SETS, ids=lambda p: p.name)
def test_golden_program_runs_where_its_loader_was_examined(golden: Path) -> None:
    """A program loads under the torch that exported it, and under another only while torch's
    program schema allows (2.15 reads 2.13's; 2.13 refuses 2.4's: "Serialized version ['5',
    '3'] does not match"), which torchkeep reports as a typed error; the bundle's class and
    weights load everywhere (test above)."""
    expected = _expected(golden)
    program = golden / "program.bundle" / "program.pt2"
    assert tk.scan(program).is_safe
    skip_unless_programs_load()
    try:
        module = tk.load_model(program, trust_program=True)
    except tk.CorruptFileError as exc:  # a torch whose program schema moved on
        assert compat.torch_version(expected["torch_version"]) != compat.torch_version()
        assert "torch.export.load could not load it" in str(exc)  # noqa: PT017 (raised or not)
        return
    with torch.no_grad():
        outputs = module(torch.tensor(INPUT))
    torch.testing.assert_close(outputs, torch.tensor(expected["outputs"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("golden", SETS, ids=lambda p: p.name)
def test_golden_checkpoint_restores_every_value(golden: Path, tmp_path: Path) -> None:
    expected = _expected(golden)
    shutil.copytree(golden / "ckpt", tmp_path / "ckpt")
    assert tk.verify(tmp_path / "ckpt").ok
    model = GoldenNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.1)
    scaler = torch.amp.GradScaler("cpu")
    restored = tk.CheckpointManager(tmp_path / "ckpt").restore(
        model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
    )
    assert (restored.step, restored.extra, restored.metrics) == (
        expected["step"],
        {"epoch": expected["epoch"]},
        expected["metrics"],
    )
    assert _records(model.state_dict()) == expected["model"]
    assert _records(optimizer_tensors(optimizer)) == expected["optimizer"]
    # every stored hyperparameter is restored; a newer torch adds its own defaults beside them
    (group,) = json.loads(json.dumps(optimizer.state_dict()["param_groups"]))
    (stored,) = expected["optimizer_groups"]
    assert {key: group[key] for key in stored} == stored
    scheduler_state = json.loads(json.dumps(scheduler.state_dict()))
    assert {key: scheduler_state[key] for key in expected["scheduler"]} == expected["scheduler"]
    assert json.loads(json.dumps(scaler.state_dict())) == expected["scaler"]
    after = expected["after_resume"]
    assert torch.rand(4).tolist() == after["torch"]
    assert random.random() == after["python"]
    assert float(np.random.rand()) == after["numpy"]


@pytest.mark.parametrize("golden", SETS, ids=lambda p: p.name)
def test_golden_onnx_holds_its_weights_and_report(golden: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="needs the onnx extra")
    from onnx import numpy_helper

    from torchkeep.onnx.report import REPORT_KEY
    from torchkeep.onnx.stored_report import parse_stored_report

    expected = _expected(golden)["onnx"]
    model = onnx.load(str(golden / "net.onnx"))
    initializers = {
        init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in model.graph.initializer
    }
    assert _records(initializers) == expected["initializers"]
    (text,) = [p.value for p in model.metadata_props if p.key == REPORT_KEY]
    report = parse_stored_report(text, path=golden / "net.onnx")
    assert report["format_version"] == 1
    assert (report["exporter"], report["opset"], report["verified_batch_sizes"]) == (
        expected["exporter"],
        expected["opset"],
        expected["verified_batch_sizes"],
    )


@pytest.mark.parametrize("golden", SETS, ids=lambda p: p.name)
def test_golden_onnx_computes_the_recorded_outputs(golden: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    session = ort.InferenceSession(str(golden / "net.onnx"), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    (outputs,) = session.run(None, {name: np.array(INPUT, dtype=np.float32)})
    expected = np.array(_expected(golden)["outputs"], dtype=np.float32)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("golden", SETS, ids=lambda p: p.name)
def test_golden_documents_record_their_format_version(golden: Path) -> None:
    step = golden / "ckpt" / "step-00000003"
    for document in (
        step / "manifest.json",
        step / "state.json",
        golden / "net.bundle" / "manifest.json",
        golden / "net.bundle" / "config.json",
    ):
        assert json.loads(document.read_text())["format_version"] == 1, document
    with safe_open(str(golden / "weights.safetensors"), "pt") as f:
        assert f.metadata()["torchkeep.format_version"] == "1"
