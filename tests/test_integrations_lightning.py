"""Lightning through TorchkeepCheckpointIO: real Trainer and Fabric runs on the CPU.

Resumes run in fresh processes (this file is also the worker: ``python
tests/test_integrations_lightning.py MODE OUT``), as a user's restarted job would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from safetensors import safe_open

import torchkeep as tk
from tests._source import SRC
from torchkeep.integrations.lightning import (
    TorchkeepCheckpointIO,
    convert_ckpt,
    load_from_checkpoint,
)


@dataclasses.dataclass
class OptimCfg:
    lr: float = 0.05
    betas: tuple[float, float] = (0.9, 0.99)


@dataclasses.dataclass(frozen=True)
class Frozen:
    name: str = "x"
    inner: OptimCfg = dataclasses.field(default_factory=OptimCfg)


class Net(L.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.05, extra: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, _: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": sched}


def _data() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(96, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return (
        torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True),
        torch.utils.data.DataLoader(ds, batch_size=48),
    )


def _trainer(ckpt_dir: Path, epochs: int, plugin: Any) -> L.Trainer:
    callback = ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", save_top_k=2, save_last=True)
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        plugins=[plugin] if plugin is not None else [],
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )


def _fit(
    ckpt_dir: Path, epochs: int, plugin: Any, ckpt_path: str | None = None, *, plain: bool = False
) -> Net:
    L.seed_everything(0, verbose=False)
    extra = {"note": "plain"} if plain else {"ns": argparse.Namespace(a=1), "cfg": OptimCfg()}
    model = Net(extra=extra)
    train, val = _data()
    _trainer(ckpt_dir, epochs, plugin).fit(model, train, val, ckpt_path=ckpt_path)
    return model


def _worker(mode: str, out: Path) -> None:
    """One training run in this (fresh) process; final weights saved as safetensors."""
    warnings.filterwarnings("ignore")
    epochs = {"straight": 4, "part1": 2, "resume": 4}[mode]
    ckpt_dir = out / ("ckpt-straight" if mode == "straight" else "ckpt")
    model = _fit(ckpt_dir, epochs, TorchkeepCheckpointIO(), "last" if mode == "resume" else None)
    tk.save_weights(model, out / f"final-{mode}.safetensors")


def _run_worker(mode: str, out: Path) -> None:
    root = str(Path(__file__).resolve().parents[1])  # the worker imports tests._source too
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), root])}
    proc = subprocess.run(
        [sys.executable, __file__, mode, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def test_two_plus_two_epochs_in_fresh_processes_equal_four_straight(tmp_path: Path) -> None:
    for mode in ("straight", "part1", "resume"):
        _run_worker(mode, tmp_path)
    straight = tk.load_state_dict(tmp_path / "final-straight.safetensors")
    resumed = tk.load_state_dict(tmp_path / "final-resume.safetensors")
    part1 = tk.load_state_dict(tmp_path / "final-part1.safetensors")
    assert sorted(straight) == sorted(resumed)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert any(not torch.equal(straight[k], part1[k]) for k in straight)  # it did train on
    checkpoints = sorted((tmp_path / "ckpt").iterdir())
    assert "last.ckpt" in [p.name for p in checkpoints]
    for step in checkpoints:
        assert step.is_dir(), step  # every checkpoint Lightning chose is a step directory
        assert tk.verify(step).ok, tk.verify(step).problems
        for file in _files(step):
            assert file.suffix in (".safetensors", ".json"), file  # no pickle anywhere
            assert b"\x80\x04\x95" not in file.read_bytes()[:64]


def test_namespace_and_dataclass_hyper_parameters_round_trip(tmp_path: Path) -> None:
    hparams = {
        "ns": argparse.Namespace(a=1, nested=argparse.Namespace(t=(1, 2.5))),
        "cfg": OptimCfg(lr=0.1),
        "frozen": Frozen(name="y"),
        "list": [OptimCfg(), {"torchkeep.hparams": "not a tag"}],
    }
    io = TorchkeepCheckpointIO(restore_rng=False)
    io.save_checkpoint({"hyper_parameters": hparams, "global_step": 3}, tmp_path / "a.ckpt")
    loaded = io.load_checkpoint(tmp_path / "a.ckpt")
    assert loaded["hyper_parameters"] == hparams
    assert type(loaded["hyper_parameters"]["frozen"]) is Frozen
    assert type(loaded["hyper_parameters"]["frozen"].inner) is OptimCfg
    assert loaded["hyper_parameters"]["ns"].nested.t == (1, 2.5)
    assert loaded["global_step"] == 3


def test_a_dataclass_whose_module_is_not_imported_comes_back_as_its_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = TorchkeepCheckpointIO(restore_rng=False)
    io.save_checkpoint({"hyper_parameters": {"cfg": OptimCfg()}}, tmp_path / "a.ckpt")
    monkeypatch.delitem(sys.modules, __name__)
    with pytest.warns(UserWarning, match="not imported"):
        loaded = io.load_checkpoint(tmp_path / "a.ckpt")
    assert loaded["hyper_parameters"]["cfg"] == {"lr": 0.05, "betas": (0.9, 0.99)}


def test_an_unstorable_hyper_parameter_is_refused_by_path_before_anything_is_written(
    tmp_path: Path,
) -> None:
    io = TorchkeepCheckpointIO()
    checkpoint = {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"extra": {"fn": len}}}
    with pytest.raises(tk.UnsupportedValueError, match=r"hyper_parameters\.extra\.fn"):
        io.save_checkpoint(checkpoint, tmp_path / "a.ckpt")
    assert list(tmp_path.iterdir()) == []
    dropping = TorchkeepCheckpointIO(hparams="drop", restore_rng=False)
    with pytest.warns(UserWarning, match=r"hyper_parameters\.extra\.fn"):
        dropping.save_checkpoint(checkpoint, tmp_path / "a.ckpt")
    loaded = dropping.load_checkpoint(tmp_path / "a.ckpt")
    assert loaded["hyper_parameters"] == {"extra": {}}
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))


def test_one_score_tensor_under_three_names_is_stored_once(tmp_path: Path) -> None:
    score = torch.tensor(0.25)
    state = {"best_model_score": score, "current_score": score, "best_k_models": {"a": score}}
    io = TorchkeepCheckpointIO(restore_rng=False)
    io.save_checkpoint({"callbacks": {"ModelCheckpoint{}": state}}, tmp_path / "a.ckpt")
    with safe_open(tmp_path / "a.ckpt" / "callbacks.safetensors", "pt") as f:
        assert len(list(f.keys())) == 1
    loaded = io.load_checkpoint(tmp_path / "a.ckpt")["callbacks"]["ModelCheckpoint{}"]
    assert loaded["best_k_models"]["a"] is loaded["best_model_score"]
    assert float(loaded["current_score"]) == 0.25


def test_load_restores_the_random_generators_saved_with_the_checkpoint(tmp_path: Path) -> None:
    io = TorchkeepCheckpointIO()
    random.seed(1)
    torch.manual_seed(1)
    io.save_checkpoint({"global_step": 1}, tmp_path / "a.ckpt")
    expected = (random.random(), torch.rand(3))
    io.load_checkpoint(tmp_path / "a.ckpt")
    assert (random.random(), torch.rand(3))[0] == expected[0]
    io.load_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(torch.rand(3), expected[1])
    TorchkeepCheckpointIO(restore_rng=False).load_checkpoint(tmp_path / "a.ckpt")
    assert not torch.equal(torch.rand(3), expected[1])


def test_load_from_checkpoint_rebuilds_the_module_with_its_hyper_parameters(
    tmp_path: Path,
) -> None:
    trained = _fit(tmp_path, 1, TorchkeepCheckpointIO())
    model = load_from_checkpoint(Net, tmp_path / "last.ckpt")
    assert isinstance(model, Net)
    assert model.hparams.extra["ns"] == argparse.Namespace(a=1)
    assert type(model.hparams.extra["cfg"]) is OptimCfg
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert load_from_checkpoint(Net, tmp_path / "last.ckpt", hidden=16, lr=0.5).hparams.lr == 0.5


def _resave_forever(path: str, checkpoint: dict[str, Any]) -> None:
    """Child: re-save ``last.ckpt`` again and again, each version marked by its number."""
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP thread pool
    io = TorchkeepCheckpointIO()
    version = 0
    while True:
        version += 1
        payload = torch.full((1 << 18,), float(version))
        io.save_checkpoint({**checkpoint, "torchkeep_test_payload": payload}, path)


def test_sigkill_during_last_ckpt_resaves_always_leaves_a_complete_checkpoint(
    tmp_path: Path,
) -> None:
    ckpt_dir = tmp_path / "ckpt"
    _fit(ckpt_dir, 1, TorchkeepCheckpointIO())
    last = ckpt_dir / "last.ckpt"
    checkpoint = TorchkeepCheckpointIO(restore_rng=False).load_checkpoint(last)
    io = TorchkeepCheckpointIO(restore_rng=False)
    io.save_checkpoint({**checkpoint, "torchkeep_test_payload": torch.zeros(4)}, last)
    context = multiprocessing.get_context("fork")
    rand = random.Random(0)
    versions = set()
    for _ in range(12):
        child = context.Process(target=_resave_forever, args=(str(last), checkpoint))
        child.start()
        time.sleep(rand.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
        loaded = io.load_checkpoint(last)  # verified whole, or it raises
        payload = loaded["torchkeep_test_payload"]
        assert bool((payload == payload[0]).all())
        assert loaded["state_dict"].keys() == checkpoint["state_dict"].keys()
        versions.add(float(payload[0]))
    assert len(versions) > 1  # the kills did land while re-saves were going on
    names = [p.name for p in ckpt_dir.iterdir() if not p.name.startswith(".")]
    assert "last.ckpt" in names
    model = _fit(ckpt_dir, 2, TorchkeepCheckpointIO(), ckpt_path="last")
    assert model.trainer.current_epoch == 2
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".")]  # temps cleaned


def test_async_checkpoint_io_wrapping_writes_verified_steps(tmp_path: Path) -> None:
    _fit(tmp_path / "ckpt", 2, AsyncCheckpointIO(TorchkeepCheckpointIO()))
    steps = sorted((tmp_path / "ckpt").iterdir())
    assert len(steps) == 3  # top-2 and last
    for step in steps:
        assert tk.verify(step).ok
    model = _fit(tmp_path / "ckpt", 3, AsyncCheckpointIO(TorchkeepCheckpointIO()), "last")
    assert model.trainer.global_step == 18


def test_fabric_save_and_load_through_the_plugin(tmp_path: Path) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[TorchkeepCheckpointIO()])
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = fabric.setup(model, opt)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tmp_path / "fabric.ckpt"
    fabric.save(path, {"model": model, "optimizer": opt, "step": 7})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in opt.state_dict()["state"].values()]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    remainder = fabric.load(path, {"model": model, "optimizer": opt})
    assert remainder == {"step": 7}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    restored = [s["momentum_buffer"] for s in opt.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, restored, strict=True))
    assert tk.verify(path).ok


def test_a_torch_saved_lightning_ckpt_converts_and_resumes(tmp_path: Path) -> None:
    _fit(tmp_path / "rich", 1, None)  # Lightning's own torch.save checkpoints
    rich = next((tmp_path / "rich").glob("epoch=*.ckpt"))  # hparams pickle a dataclass
    with pytest.raises(tk.UnsafeCheckpointError):
        convert_ckpt(rich, tmp_path / "refused.ckpt")
    assert not (tmp_path / "refused.ckpt").exists()
    _fit(tmp_path / "plain", 1, None, plain=True)
    source = next((tmp_path / "plain").glob("epoch=*.ckpt"))
    with pytest.raises(tk.FileFormatError, match="convert_ckpt"):
        TorchkeepCheckpointIO().load_checkpoint(source)
    target = convert_ckpt(source, tmp_path / "converted.ckpt")
    assert tk.verify(target).ok
    original = torch.load(source, weights_only=True)["state_dict"]
    converted = TorchkeepCheckpointIO().load_checkpoint(target)
    for key, value in original.items():
        assert torch.equal(converted["state_dict"][key], value)
    model = _fit(tmp_path / "again", 2, TorchkeepCheckpointIO(), str(target), plain=True)
    assert model.trainer.current_epoch == 2
    # the CLI's generic route imports the same file into a checkpoint folder
    from torchkeep.convert import convert

    step = convert(source, tmp_path / "folder").destination
    restored = tk.CheckpointManager(tmp_path / "folder").restore(model=Net(), restore_rng=False)
    assert restored.extra["global_step"] == converted["global_step"]
    assert json.loads((step / "manifest.json").read_text())["format"] == "torchkeep.checkpoint"


def test_without_lightning_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "torchkeep.integrations.lightning")
    with pytest.raises(tk.MissingDependencyError, match=r"torchkeep\[lightning\]"):
        import torchkeep.integrations.lightning  # noqa: F401


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
