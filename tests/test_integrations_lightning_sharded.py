"""Lightning's ModelParallelStrategy (FSDP2) through TorchkeepModelParallelStrategy, 2 gloo ranks.

One spawn of two processes trains 4 epochs straight, then 2 epochs in another folder; a fresh
pair resumes the second with ``ckpt_path="last"`` for 2 more. Workers:
tests/_lightning_sharded_workers.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

from safetensors import safe_open
from safetensors.torch import load_file

import torchkeep as tk
from tests import _dist_harness
from tests._compat import needs_sharded_checkpoints
from torchkeep.cli import main

pytestmark = needs_sharded_checkpoints

WORKERS = "tests._lightning_sharded_workers"
PICKLE_NAMES = (".pt", ".pth", ".bin", ".pkl", ".metadata", ".distcp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("lightning-sharded")
    first = _dist_harness.run(
        "fit",
        2,
        {"out": str(out), "runs": [("straight", 4, False), ("part", 2, False)]},
        module=WORKERS,
    ).ok()
    second = _dist_harness.run(
        "fit", 2, {"out": str(out), "runs": [("part", 4, True)]}, module=WORKERS
    ).ok()
    return out, first[0], second[0]


def test_resume_from_last_is_bit_identical_to_a_straight_run(
    runs: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    out, first, second = runs
    steps_per_epoch = first["straight"]["global_step"] // 4
    assert first["part"]["global_step"] == 2 * steps_per_epoch
    # the fresh pair really resumed: it ran only the last 2 epochs
    assert second["part"]["steps_run"] == 2 * steps_per_epoch
    assert second["part"]["global_step"] == first["straight"]["global_step"]
    straight = load_file(str(out / "final-straight.st"))
    resumed = load_file(str(out / "final-part.st"))
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_every_checkpoint_is_a_verified_sharded_step_without_pickle(
    runs: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    out, _, _ = runs
    steps = sorted((out / "ckpt-part").iterdir())
    names = {p.name for p in steps}
    assert "last.ckpt" in names, names
    assert len(names) == 5, names  # 4 epochs + last
    for step in steps:
        files = sorted(p.name for p in step.iterdir())
        assert files == [
            "manifest.json",
            "shard-00000-of-00002.safetensors",
            "shard-00001-of-00002.safetensors",
            "state.json",
        ], (step, files)
        for path in step.iterdir():
            assert not path.name.endswith(PICKLE_NAMES), path
            assert path.name != "meta.pt", path
            data = path.read_bytes()
            assert not data.startswith(b"\x80"), path  # no pickle protocol header
            if path.suffix == ".json":
                json.loads(data)
            else:
                with safe_open(str(path), "pt") as f:
                    assert list(f.keys())
        assert tk.verify(step).ok, step
    last = out / "ckpt-part" / "last.ckpt"
    assert main(["verify", str(last)]) == 0
    assert main(["inspect", str(last)]) == 0
    # convert merges the shards: the last step holds the run's final weights
    assert main(["convert", str(last), str(out / "full.safetensors")]) == 0
    full = load_file(str(out / "full.safetensors"))
    for name, tensor in load_file(str(out / "final-part.st")).items():
        assert torch.equal(full[f"model/{name}"], tensor), name
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["layout"] == "sharded-v1"
    assert manifest["world_size"] == 2
    state = json.loads((last / "state.json").read_text())
    entries = state["entries"]
    assert entries["model"]["scope"] == entries["optimizer"]["scope"] == "sharded"
    assert entries["loops"]["scope"] == entries["hyper_parameters"]["scope"] == "replicated"
    assert entries["torchkeep.rng"]["scope"] == "per_rank"


def test_unsupported_settings_are_refused_at_construction() -> None:
    from torchkeep.integrations.lightning import TorchkeepModelParallelStrategy

    with pytest.raises(ValueError, match="TorchkeepCheckpointIO"):
        TorchkeepModelParallelStrategy(save_distributed_checkpoint=False)
    with pytest.raises(ValueError, match="hparams"):
        TorchkeepModelParallelStrategy(hparams="maybe")  # type: ignore[arg-type]
    with pytest.raises(tk.UnsupportedValueError):
        TorchkeepModelParallelStrategy(per_rank=("a/b",))
    strategy = TorchkeepModelParallelStrategy(tensor_parallel_size=1, per_rank=("callbacks",))
    assert strategy.per_rank == ("callbacks",)
