"""CheckpointManager: round trips, commit protocol, corruption fallback, retention, disk full."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import torchkeep as tk
from tests.conftest import TiedLM, assert_state_equal
from torchkeep.models import Net
from torchkeep.storage import local


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()


@pytest.fixture
def trained() -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net(dropout=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _train(model, opt)
    return model, opt


def _fresh() -> tuple[Net, torch.optim.Optimizer]:
    model = Net(dropout=0.1)
    return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.1)


def test_round_trip_model_optimizer_values_and_layout(tmp_path: Path, trained) -> None:
    model, opt = trained
    mgr = tk.CheckpointManager(tmp_path)
    path = mgr.save(7, model=model, optimizer=opt, metrics={"loss": 0.25}, epoch=3, tag="x")
    assert path == tmp_path / "step-00000007"
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
        "torchkeep.rng.safetensors",
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "torchkeep.checkpoint"
    assert manifest["step"] == 7
    assert manifest["metrics"] == {"loss": 0.25}
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:  # plain safetensors
        assert sorted(f.keys()) == sorted(model.state_dict())
    assert_state_equal(tk.load_state_dict(path), model.state_dict())

    model2, opt2 = _fresh()
    restored = tk.CheckpointManager(tmp_path).restore(model=model2, optimizer=opt2)
    assert (restored.step, restored.metrics, restored.extra) == (
        7,
        {"loss": 0.25},
        {"epoch": 3, "tag": "x"},
    )
    assert_state_equal(model.state_dict(), model2.state_dict())
    assert str(opt.state_dict()) == str(opt2.state_dict())
    for a, b in zip(
        opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True
    ):
        assert_state_equal(a, b)


def test_tied_weights_written_once_and_restored(tmp_path: Path, tied: TiedLM) -> None:
    mgr = tk.CheckpointManager(tmp_path, save_rng=False)
    path = mgr.save(1, model=tied)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert "head.weight" not in set(f.keys())
    fresh = TiedLM()
    mgr.restore(model=fresh)
    assert_state_equal(tied.state_dict(), fresh.state_dict())
    assert fresh.head.weight is fresh.embed.weight


def test_rng_states_are_restored(tmp_path: Path) -> None:
    mgr = tk.CheckpointManager(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    mgr.save(0)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    mgr.restore()
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == got[:2]
    assert torch.equal(expected[2], got[2])


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3),
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt),
                torch.optim.lr_scheduler.ExponentialLR(opt, 0.9),
            ],
            milestones=[2],
        ),
    ],
)
def test_lr_schedulers_round_trip_exactly(tmp_path: Path, make) -> None:
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.AdamW(params, lr=0.01)
    sched = make(opt)
    for _ in range(5):
        opt.step()
        sched.step(1.0) if isinstance(
            sched, torch.optim.lr_scheduler.ReduceLROnPlateau
        ) else sched.step()
    mgr = tk.CheckpointManager(tmp_path, save_rng=False)
    mgr.save(5, optimizer=opt, scheduler=sched)
    params2 = [torch.nn.Parameter(torch.ones(2))]
    opt2 = torch.optim.AdamW(params2, lr=0.01)
    sched2 = make(opt2)
    mgr.restore(optimizer=opt2, scheduler=sched2)
    assert repr(sched.state_dict()) == repr(sched2.state_dict())
    assert repr(opt.state_dict()) == repr(opt2.state_dict())


def test_grad_scaler_round_trips(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler._growth_tracker = None  # lazily created; exercise the real state below
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        scaler.scale(model(torch.randn(2, 3, 32, 32)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    mgr = tk.CheckpointManager(tmp_path, save_rng=False)
    mgr.save(4, scaler=scaler)
    scaler2 = torch.amp.GradScaler("cpu")
    mgr.restore(scaler=scaler2)
    assert scaler2.state_dict() == scaler.state_dict()
    assert scaler2.get_scale() == scaler.get_scale()


def test_unsupported_value_fails_before_anything_is_written(tmp_path: Path) -> None:
    mgr = tk.CheckpointManager(tmp_path)
    with pytest.raises(tk.UnsupportedValueError, match=r"cannot save config\.fn"):
        mgr.save(1, config={"fn": print})
    assert list(tmp_path.iterdir()) == []


def test_step_exists_error_and_atomic_overwrite(tmp_path: Path, trained) -> None:
    model, _ = trained
    mgr = tk.CheckpointManager(tmp_path, save_rng=False)
    mgr.save(1, model=model, epoch=1)
    with pytest.raises(tk.StepExistsError, match="overwrite=True") as info:
        mgr.save(1, model=model, epoch=2)
    assert isinstance(info.value, FileExistsError)
    assert mgr.restore().extra["epoch"] == 1
    mgr.save(1, model=model, epoch=2, overwrite=True)
    assert mgr.restore().extra["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_leftover_temp_dir_is_ignored_and_cleaned(tmp_path: Path, trained) -> None:
    model, _ = trained
    mgr = tk.CheckpointManager(tmp_path, save_rng=False)
    mgr.save(1, model=model)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftover = tmp_path / f".step-00000002{local.TEMP_MARKER}{int(dead.stdout)}-abcd1234"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    half_step = tmp_path / "step-00000003"  # a step directory without manifest: not committed
    half_step.mkdir()
    assert mgr.steps == [1]
    with pytest.warns(UserWarning, match="step-00000003 is unusable.*no manifest.json"):
        assert mgr.restore().step == 1
    mgr.save(4, model=model)
    assert not leftover.exists()
    assert half_step.exists()  # not recognisable as ours: left alone
    assert mgr.steps == [1, 4]


def _corrupt(step_dir: Path, how: str) -> None:
    target = step_dir / "optimizer.safetensors"
    if how == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0x01
        target.write_bytes(bytes(data))
    elif how == "truncate":
        os.truncate(target, target.stat().st_size - 8)
    elif how == "missing":
        target.unlink()
    elif how == "manifest":
        (step_dir / "manifest.json").write_text("{not json")
    elif how == "state":
        text = (step_dir / "state.json").read_text()
        (step_dir / "state.json").write_text(text.replace('"step": 2', '"step": 9'))


@pytest.mark.parametrize("how", ["flip", "truncate", "missing", "manifest", "state"])
def test_corrupt_latest_step_falls_back_with_warning(tmp_path: Path, trained, how: str) -> None:
    model, opt = trained
    mgr = tk.CheckpointManager(tmp_path)
    mgr.save(1, model=model, optimizer=opt, epoch=1)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt)
    mgr.save(2, model=model, optimizer=opt, epoch=2)
    _corrupt(tmp_path / "step-00000002", how)

    report = tk.verify(tmp_path)
    assert not report.ok
    assert any("step-00000002" in p for p in report.problems)
    assert report.checked[tmp_path / "step-00000001"] == []

    fresh, fresh_opt = _fresh()
    with pytest.warns(UserWarning, match="step.*2 is unusable") as record:
        restored = mgr.restore(model=fresh, optimizer=fresh_opt)
    assert "step-00000002" in str(record[0].message)
    assert mgr.steps == ([1] if how == "manifest" else [1, 2])
    assert restored.step == 1
    assert restored.extra["epoch"] == 1
    assert_state_equal(reference, fresh.state_dict())

    if how != "manifest":
        with pytest.raises(tk.CorruptFileError):  # asked for explicitly: no silent fallback
            mgr.restore(2, model=fresh)
    untouched, _ = _fresh()
    snapshot = {k: v.clone() for k, v in untouched.state_dict().items()}
    (tmp_path / "step-00000001" / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unusable"), pytest.raises(tk.CheckpointNotFoundError):
        mgr.restore(model=untouched)
    assert_state_equal(snapshot, untouched.state_dict())  # nothing half-loaded


def test_restore_errors(tmp_path: Path, trained) -> None:
    model, opt = trained
    mgr = tk.CheckpointManager(tmp_path)
    with pytest.raises(tk.CheckpointNotFoundError):
        mgr.restore(model=model)
    mgr.save(3, model=model, epoch=1)
    with pytest.raises(tk.StateDictMismatchError, match="no 'optimizer'"):
        mgr.restore(model=model, optimizer=opt)
    with pytest.raises(tk.StateDictMismatchError, match="plain value"):
        mgr.restore(epoch=opt)
    with pytest.raises(tk.CheckpointNotFoundError):
        mgr.restore(4)
    with pytest.raises(tk.StepExistsError):
        mgr.save(3, model=model)
    with pytest.raises(ValueError, match="non-negative"):
        mgr.save(-1, model=model)


def _steps_with(tmp_path: Path, mgr: tk.CheckpointManager, losses: dict[int, float]) -> None:
    for step, loss in losses.items():
        mgr.save(step, metrics={"loss": loss})


def test_retention_union_survives_restart_and_spares_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step-notes").mkdir()
    settings = dict(keep_last=2, keep_best=1, monitor="loss", keep_every=4, save_rng=False)
    mgr = tk.CheckpointManager(tmp_path, **settings)
    _steps_with(tmp_path, mgr, {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.6, 5: 0.7})
    assert mgr.steps == [2, 4, 5]  # best (2), every 4 (4), last 2 (4, 5)
    assert mgr.best_step == 2
    restarted = tk.CheckpointManager(tmp_path, **settings)
    _steps_with(tmp_path, restarted, {6: 0.8, 7: 0.3})
    assert restarted.steps == [2, 4, 6, 7]
    assert restarted.restore("best").step == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "step-notes").is_dir()


def test_keep_best_max_mode_and_keep_all(tmp_path: Path) -> None:
    mgr = tk.CheckpointManager(
        tmp_path / "a", keep_last=1, keep_best=2, monitor="acc", mode="max", save_rng=False
    )
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.1)]:
        mgr.save(step, metrics={"acc": acc})
    assert mgr.steps == [2, 3, 4]
    keep_all = tk.CheckpointManager(tmp_path / "b", keep_last=None, save_rng=False)
    for step in range(5):
        keep_all.save(step)
    assert keep_all.steps == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="monitor"):
        tk.CheckpointManager(tmp_path, keep_best=1)
    with pytest.raises(ValueError, match="keep_last"):
        tk.CheckpointManager(tmp_path, keep_last=0)


def test_injected_enospc_keeps_earlier_steps(tmp_path: Path, trained, monkeypatch) -> None:
    model, opt = trained
    mgr = tk.CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, model=model, optimizer=opt)
    real = os.pwrite

    def full(fd: int, data, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(tk.StorageFullError, match="no space left") as info:
        mgr.save(2, model=model, optimizer=opt)
    assert isinstance(info.value, OSError)
    monkeypatch.setattr(os, "pwrite", real)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    assert tk.verify(tmp_path).ok


@pytest.fixture
def small_fs(tmp_path: Path):
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:  # lazily if a background deletion still holds a file: never leave a mount behind
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_real_full_disk(small_fs: Path) -> None:
    mgr = tk.CheckpointManager(small_fs / "ckpt", keep_last=5, save_rng=False)
    mgr.save(1, weights=torch.zeros(64 * 1024))  # 256 KiB
    mgr.save(2, weights=torch.ones(64 * 1024))
    with pytest.raises(tk.StorageFullError):
        mgr.save(3, weights=torch.ones(256 * 1024))  # 1 MiB does not fit
    assert sorted(p.name for p in (small_fs / "ckpt").iterdir()) == [
        "step-00000001",
        "step-00000002",
    ]
    assert tk.verify(small_fs / "ckpt").ok
    assert torch.equal(mgr.restore().extra["weights"], torch.ones(64 * 1024))


def test_verify_rejects_other_paths(tmp_path: Path) -> None:
    with pytest.raises(tk.TorchkeepFileNotFoundError):
        tk.verify(tmp_path / "nope")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(tk.FileFormatError):
        tk.verify(tmp_path / "w.bin")
