"""torchkeep.compat: the torch-version differences, decided in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep import compat

GOLDEN = Path(__file__).parent / "golden"


def test_versions_parse() -> None:
    assert compat.torch_version("2.4.1+cu121") == (2, 4)
    assert compat.torch_version("2.15.0") == (2, 15)
    assert compat.torch_version() >= compat.OLDEST_SUPPORTED
    with pytest.raises(ValueError, match="cannot parse"):
        compat.torch_version("nightly")


def test_programs_load_only_under_an_examined_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean program is refused, by torchkeep's gate, under a torch whose loader nobody
    examined; the bundle's class still loads."""
    program = GOLDEN / "format-v1-torch-2.13.0" / "program.bundle" / "program.pt2"
    assert tk.scan(program).is_safe
    monkeypatch.setattr(compat, "PROGRAM_LOADERS_EXAMINED", frozenset({(1, 0)}))
    called: list[object] = []
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: called.append(a))
    with pytest.raises(tk.UnsafeCheckpointError, match=r"needs a torch whose torch\.export\.load"):
        tk.load_model(program, trust_program=True)
    assert called == []
    assert tk.load_model(program.parent) is not None


def test_sharded_checkpoints_are_refused_under_an_older_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a torch older than 2.6, a distributed manager and the DCP writer and reader raise
    DistributedCheckpointError naming the version, before anything is written or joined."""
    from torchkeep.distributed import TorchkeepStorageReader, TorchkeepStorageWriter

    monkeypatch.setattr(compat, "torch_version", lambda version=None: (2, 4))
    assert not compat.sharded_checkpoints_available()
    with pytest.raises(
        tk.DistributedCheckpointError, match=r"needs torch >= 2\.6.*distributed=False"
    ):
        tk.CheckpointManager(tmp_path / "ckpt", distributed=True)
    with pytest.raises(tk.DistributedCheckpointError, match=r"import_dcp needs torch >= 2\.6"):
        tk.checkpoint.import_dcp(tmp_path / "dcp", tmp_path / "ckpt")
    for engine in (TorchkeepStorageWriter, TorchkeepStorageReader):
        with pytest.raises(tk.DistributedCheckpointError, match=r"needs torch >= 2\.6"):
            engine(tmp_path / "step")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_distributed_manager_needs_a_process_group_where_sharding_is_available(
    tmp_path: Path,
) -> None:
    if not compat.sharded_checkpoints_available():
        pytest.skip(f"torch {torch.__version__}: sharded checkpoints need torch >= 2.6")
    with pytest.raises(ValueError, match="init_process_group"):
        tk.CheckpointManager(tmp_path / "ckpt", distributed=True)
