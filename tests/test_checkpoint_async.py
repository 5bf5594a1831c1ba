"""async_save=True: snapshot semantics, error surfacing, bounded memory, exit waits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from tests.conftest import assert_state_equal
from torchkeep.checkpoint import manager as manager_module
from torchkeep.models import Net


def test_changes_after_save_do_not_reach_the_file(tmp_path: Path, net: Net) -> None:
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    release = threading.Event()
    real = manager_module.write_step

    def slow_write(*args, **kwargs) -> None:
        release.wait(10)
        real(*args, **kwargs)

    with tk.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, model=net)
        manager_module.write_step = slow_write
        try:
            mgr.save(2, model=net, counter=torch.arange(3))
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(1.0)  # training goes on while step 2 is written
            assert mgr.steps == [1]  # not committed yet
            release.set()
        finally:
            manager_module.write_step = real
    fresh = Net()
    assert mgr.restore(model=fresh).step == 2
    assert_state_equal(expected, fresh.state_dict())


def test_snapshot_buffers_are_reused_between_saves(tmp_path: Path, net: Net) -> None:
    with tk.CheckpointManager(tmp_path, async_save=True, save_rng=False) as mgr:
        mgr.save(1, model=net)
        first = {k: v.data_ptr() for k, v in mgr._buffers._buffers.items()}
        mgr.save(2, model=net)
        second = {k: v.data_ptr() for k, v in mgr._buffers._buffers.items()}
        mgr.save(3, other=torch.zeros(3))  # buffers the snapshot no longer needs are dropped
        assert list(mgr._buffers._buffers) == [("other", "other")]
    assert first == second
    assert mgr.steps == [1, 2, 3]


def test_background_error_surfaces_on_wait_save_and_exit(
    tmp_path: Path, net: Net, monkeypatch
) -> None:
    def broken(*args, **kwargs) -> None:
        raise tk.StorageFullError(28, "disk full (injected)")

    mgr = tk.CheckpointManager(tmp_path, async_save=True)
    monkeypatch.setattr(manager_module, "write_step", broken)
    mgr.save(1, model=net)  # returns: the failure happens in the background
    with pytest.raises(tk.StorageFullError, match="injected"):
        mgr.wait()
    mgr.wait()  # reported once
    mgr.save(2, model=net)
    with pytest.raises(tk.StorageFullError, match="injected"):
        mgr.save(3, model=net)
    with pytest.raises(tk.StorageFullError, match="injected"), mgr:
        mgr.save(4, model=net)
    monkeypatch.undo()
    mgr.save(5, model=net)
    mgr.wait()
    assert mgr.steps == [5]


def test_interpreter_exit_waits_for_the_save(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import time, torch, torchkeep as tk
        from torchkeep.checkpoint import manager
        real = manager.write_step
        def slow(*args, **kwargs):
            time.sleep(0.5)
            real(*args, **kwargs)
        manager.write_step = slow
        mgr = tk.CheckpointManager({str(tmp_path)!r}, async_save=True)
        mgr.save(1, weights=torch.arange(1000))
        print("leaving", mgr.steps)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "leaving []" in result.stdout
    mgr = tk.CheckpointManager(tmp_path)
    assert mgr.steps == [1]
    assert torch.equal(mgr.restore().extra["weights"], torch.arange(1000))
