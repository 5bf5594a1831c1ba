"""From and to the tutorial's torch.save checkpoint dict; the ls and verify commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from tests.conftest import assert_state_equal
from torchkeep.checkpoint import import_torch_checkpoint
from torchkeep.cli import main
from torchkeep.models import Net


def _tutorial_checkpoint(path: Path) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
    torch.save(
        {
            "epoch": 5,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "loss": torch.tensor(0.4),
        },
        path,
    )
    return model, opt


def test_import_tutorial_checkpoint_then_restore(tmp_path: Path) -> None:
    model, opt = _tutorial_checkpoint(tmp_path / "old.pt")
    step_dir = import_torch_checkpoint(tmp_path / "old.pt", tmp_path / "ckpt")
    assert step_dir == tmp_path / "ckpt" / "step-00000005"
    fresh = Net()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5)
    restored = tk.CheckpointManager(tmp_path / "ckpt").restore(model=fresh, optimizer=fresh_opt)
    assert restored.step == 5
    assert restored.metrics == {"loss": pytest.approx(0.4)}
    assert restored.extra["epoch"] == 5
    assert_state_equal(model.state_dict(), fresh.state_dict())
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for key, state in opt.state_dict()["state"].items():
        assert_state_equal(state, fresh_opt.state_dict()["state"][key])
    with pytest.raises(tk.StepExistsError):
        import_torch_checkpoint(tmp_path / "old.pt", tmp_path / "ckpt")
    assert (
        import_torch_checkpoint(tmp_path / "old.pt", tmp_path / "ckpt", step=9).name
        == "step-00000009"
    )


def test_import_refuses_code_and_non_checkpoints(tmp_path: Path) -> None:
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "cls": Net}, tmp_path / "evil.pt")
    with pytest.raises(tk.UnsafeCheckpointError):
        import_torch_checkpoint(tmp_path / "evil.pt", tmp_path / "ckpt")
    torch.save({"weights_of_sorts": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(tk.FileFormatError, match="no model state dict"):
        import_torch_checkpoint(tmp_path / "odd.pt", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_export_torch_is_tutorial_style_and_weights_only(tmp_path: Path) -> None:
    model, opt = _tutorial_checkpoint(tmp_path / "old.pt")
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(12, model=model, optimizer=opt, metrics={"loss": 0.3}, epoch=2)
    out = mgr.export_torch(None, tmp_path / "export.pt")
    data = torch.load(out, weights_only=True)
    assert {"epoch", "model_state_dict", "optimizer_state_dict", "loss"} <= set(data)
    assert (data["epoch"], data["loss"], data["step"]) == (2, 0.3, 12)
    assert "rng" not in data
    fresh = Net()
    fresh.load_state_dict(data["model_state_dict"])
    assert_state_equal(model.state_dict(), fresh.state_dict())
    torch.optim.SGD(fresh.parameters(), lr=1.0).load_state_dict(data["optimizer_state_dict"])


def _ckpt(tmp_path: Path) -> Path:
    mgr = tk.CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss", save_rng=False)
    for step, loss in [(1, 0.2), (2, 0.5), (3, 0.4), (4, 0.3)]:
        mgr.save(step, weights=torch.full((10,), float(step)), metrics={"loss": loss})
    return tmp_path


def test_ls_lists_steps_with_retention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _ckpt(tmp_path)
    assert main(["ls", str(directory), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    rows = {row["step"]: row for row in listing["steps"]}
    assert sorted(rows) == [1, 3, 4]
    assert rows[1]["kept_by"] == ["best 1 (loss min)"]
    assert rows[4]["kept_by"] == ["last 2"]
    assert all(row["valid"] for row in rows.values())
    assert rows[3]["metrics"] == {"loss": 0.4}
    assert main(["ls", str(directory)]) == 0
    table = capsys.readouterr().out
    assert "best 1 (loss min)" in table
    assert "loss=0.4" in table


def test_verify_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _ckpt(tmp_path)
    assert main(["verify", str(directory)]) == 0
    assert main(["verify", str(directory / "step-00000004")]) == 0
    (directory / "step-00000003" / "weights.safetensors").write_bytes(b"broken")
    (directory / "step-00000004" / "state.json").unlink()
    capsys.readouterr()
    assert main(["verify", str(directory), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert len(report["problems"]) == 2
    assert report["checked"][str(directory / "step-00000001")] == []
    assert main(["verify", str(tmp_path / "missing")]) == 2


def test_demo_checkpoint_step_resumes_and_lists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchkeep.cli.demo import _checkpoint_step

    _checkpoint_step(tmp_path)
    out = capsys.readouterr().out
    assert "preempted after epoch 1" in out
    assert "resumed from step 32" in out
    assert tk.CheckpointManager(tmp_path / "checkpoints").steps == [48, 64]
