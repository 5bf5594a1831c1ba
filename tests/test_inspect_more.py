"""``inspect`` on checkpoints and pickled whole models: described without loading code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.cli import main
from torchkeep.describe import describe
from torchkeep.formats import Format
from torchkeep.models import Net


@pytest.fixture
def checkpoints(tmp_path: Path, net: Net) -> Path:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    manager = tk.CheckpointManager(tmp_path / "ckpt", keep_last=None)
    for step in (10, 20):
        manager.save(step, model=net, optimizer=optimizer, metrics={"loss": 1 / step}, epoch=step)
    return tmp_path / "ckpt"


def test_a_step_lists_every_file_and_value(checkpoints: Path, net: Net) -> None:
    description = describe(checkpoints / "step-00000020")
    assert description.format == Format.CHECKPOINT_STEP
    names = {t.name for t in description.tensors}
    assert {f"model.{k}" for k in net.state_dict()} <= names
    assert "optimizer.state[0].momentum_buffer" in names
    assert dict(description.sections["checkpoint"])["step"] == "20"
    assert dict(description.sections["checkpoint"])["metrics"] == "loss=0.05"
    assert dict(description.sections["values"])["epoch"] == "20"


def test_a_folder_describes_its_latest_step_and_lists_all(checkpoints: Path) -> None:
    description = describe(checkpoints)
    assert description.format == Format.CHECKPOINT_DIR
    assert [step for step, _ in description.sections["steps"]] == ["10", "20"]
    assert dict(description.sections["checkpoint"])["step"] == "20"
    assert "latest step, 20" in description.notes[0]


def test_inspect_cli_on_a_checkpoint_folder(
    checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(checkpoints), "--json"]) == 0
    assert '"checkpoint-dir"' in capsys.readouterr().out


def test_pickled_whole_model_is_described_by_scan_not_loaded(tmp_path: Path, net: Net) -> None:
    path = tmp_path / "whole.pth"
    torch.save(net, path)
    description = describe(path)
    classes = dict(description.sections["pickled classes"])
    assert classes["torchkeep.models.Net"] == "user"
    assert classes["torch.nn.modules.linear.Linear"] == "torch-layer"
    assert description.tensors == []
    assert "load_pickled_model" in description.notes[0]
