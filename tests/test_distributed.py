"""Sharded checkpoints saved by N gloo ranks (FSDP2, DDP, a Shard(1) DTensor) and restored on
any M, in spawned processes (tests/_dist_harness.py); failure, corruption, async, retention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import _dist_harness as harness

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Any]]:
    """4 FSDP2 ranks: the replicated check, steps 3 and 5, a failing rank, retention, async."""
    out = tmp_path_factory.mktemp("dist")
    return out, harness.run("save_many", 4, {"out": str(out)}).ok()


def test_save_on_four_ranks(saved: tuple[Path, dict[int, Any]]) -> None:
    out, results = saved
    for rank, report in results.items():
        assert report["own_group"], rank
        # a replicated entry that differs names the entry and suggests per_rank=
        assert "'lr_note'" in report["mismatch"]
        assert "per_rank=" in report["mismatch"]
        # a rank raising in write_data: every rank raises, nothing committed
        assert report["fail"][0] == "DistributedCheckpointError"
        assert 2 in report["fail"][1]
        assert report["steps_after_fail"] == [3]
        assert report["kept"] == [3, 4]
        # async: an injected write error surfaces at the next save() on every rank
        assert report["async_error"], rank
        assert report["async_steps"] == [1]
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000003", "step-00000005"]
    step = ckpt / "step-00000005"
    assert sorted(p.name for p in step.iterdir()) == [
        "manifest.json",
        "shard-00000-of-00004.safetensors",
        "shard-00001-of-00004.safetensors",
        "shard-00002-of-00004.safetensors",
        "shard-00003-of-00004.safetensors",
        "state.json",
    ]
