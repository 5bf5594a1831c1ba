"""Accelerate: save_state/load_state over CheckpointManager, and use_torchkeep_for_weights."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from safetensors import safe_open

import torchkeep as tk
from tests.conftest import TiedLM
from torchkeep.integrations.accelerate import load_state, save_state, use_torchkeep_for_weights


def _objects(accelerator: Accelerator, seed: int) -> tuple[Any, Any, Any, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(40, 6, generator=g), torch.randn(40, 1, generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    return accelerator.prepare(model, opt, sched, loader)  # type: ignore[no-any-return]


def _epoch(accelerator: Accelerator, objs: tuple[Any, Any, Any, Any], epoch: int) -> None:
    model, opt, sched, loader = objs
    loader.set_epoch(epoch)
    for x, y in loader:
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    sched.step()


def test_save_state_and_load_state_resume_bit_exactly(tmp_path: Path) -> None:
    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    first = _objects(accelerator, seed=0)
    _epoch(accelerator, first, 0)
    model, opt, sched, loader = first
    step = save_state(
        accelerator, tmp_path, 5, model=model, optimizer=opt, scheduler=sched,
        dataloader=loader, metrics={"loss": 0.5}, epoch=0,
    )  # fmt: skip
    assert tk.verify(step).ok
    assert {p.suffix for p in step.iterdir()} == {".json", ".safetensors"}  # no pickle
    entries = json.loads((step / "state.json").read_text())["entries"]
    assert {"model", "optimizer", "scheduler", "dataloader", "epoch"} <= set(entries)
    saved_opt = copy.deepcopy(opt.state_dict())
    _epoch(accelerator, first, 1)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    second = _objects(accelerator, seed=123)  # other weights, other sampler seed, other RNG
    model2, opt2, sched2, loader2 = second
    restored = load_state(
        accelerator, tmp_path, model=model2, optimizer=opt2, scheduler=sched2, dataloader=loader2
    )
    assert (restored.step, restored.extra["epoch"], restored.metrics) == (5, 0, {"loss": 0.5})
    for key, value in saved_opt["state"].items():
        for name, tensor in value.items():
            assert torch.equal(opt2.state_dict()["state"][key][name], tensor)
    assert sched2.state_dict()["last_epoch"] == 1
    _epoch(accelerator, second, 1)
    for key, value in model2.state_dict().items():
        assert torch.equal(value, straight[key]), key


def test_use_torchkeep_for_weights_writes_and_reads_the_models_through_torchkeep(
    tmp_path: Path,
) -> None:
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(TiedLM())
    use_torchkeep_for_weights(accelerator)
    accelerator.save_state(str(tmp_path / "ckpt"))
    weights = tmp_path / "ckpt" / "model.safetensors"
    with safe_open(weights, "pt") as f:
        assert "torchkeep.version" in (f.metadata() or {})
        assert len(list(f.keys())) == len(model.state_dict()) - 1  # the tied head stored once
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    accelerator.load_state(str(tmp_path / "ckpt"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.head.weight is model.embed.weight


def test_without_accelerate_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)
    monkeypatch.delitem(sys.modules, "torchkeep.integrations.accelerate")
    with pytest.raises(tk.MissingDependencyError, match=r"torchkeep\[accelerate\]"):
        import torchkeep.integrations.accelerate  # noqa: F401
