"""tk.checkpoint.import_dcp: a checkpoint written by plain dcp.save becomes a torchkeep step;
a hostile .metadata or item is refused by torchkeep's own gates without running anything."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchkeep as tk
from tests._compat import needs_sharded_checkpoints
from tests._live import prove_live

pytestmark = needs_sharded_checkpoints

DCP_LOAD = (
    "import torch.distributed.checkpoint as dcp\n"
    "dcp.load({{'x': 0, 'epoch': 0}}, checkpoint_id={path}, no_dist=True)"
)


class _Payload:
    """Pickles as a call of os.system (touches the canary when unpickled)."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.canary}",))


def _dcp_save(state: dict[str, object], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_import_dcp_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    _dcp_save(state, tmp_path / "dcp")
    step = tk.checkpoint.import_dcp(tmp_path / "dcp", tmp_path / "ckpt", step=7)
    assert step.name == "step-00000007"
    assert tk.verify(tmp_path / "ckpt").ok
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    restored = tk.CheckpointManager(tmp_path / "ckpt").restore(model=fresh, optimizer=fresh_opt)
    assert restored.step == 7
    assert restored.extra["epoch"] == 3
    for key, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_import_dcp_refuses_a_metadata_pickle_that_runs_code(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    _dcp_save({"x": torch.ones(2), "epoch": 1}, tmp_path / "dcp")
    import pickle

    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(canary)))
    prove_live(DCP_LOAD, canary, path=tmp_path / "dcp")  # dcp.load runs it
    with pytest.raises(tk.UnsafeCheckpointError, match=r"posix\.system|os\.system"):
        tk.checkpoint.import_dcp(tmp_path / "dcp", tmp_path / "ckpt")
    assert not canary.exists()
    assert not (tmp_path / "ckpt").exists()


def test_import_dcp_refuses_an_item_that_runs_code(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    _dcp_save({"x": _Payload(canary), "epoch": 1}, tmp_path / "dcp")  # a pickled byte item
    prove_live(DCP_LOAD, canary, path=tmp_path / "dcp")  # dcp.load torch.loads it
    with pytest.raises(tk.UnsafeCheckpointError, match="pickled code"):
        tk.checkpoint.import_dcp(tmp_path / "dcp", tmp_path / "ckpt")
    assert not canary.exists()
    assert not (tmp_path / "ckpt").exists()
