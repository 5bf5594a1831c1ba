"""Sharded checkpoints saved by N gloo ranks (FSDP2, DDP, a Shard(1) DTensor) and restored on
any M, in spawned processes (tests/_dist_harness.py); failure, corruption, async, retention."""

from __future__ import annotations

import json
import shutil
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


def test_restore_on_four_ranks_with_rng_and_bit_exact_resume(
    saved: tuple[Path, dict[int, Any]],
) -> None:
    out, _ = saved
    ctx = {"out": str(out), "dirs": [("ckpt", "ref5.safetensors")], "saved_world": 4}
    results = harness.run("restore_check", 4, {**ctx, "resume": True}).ok()
    for rank, report in results.items():
        entry = report["ckpt"]
        assert entry["step"] == 5
        assert entry["epoch"] == 2
        assert entry["mismatch"] == [], rank
        assert entry["rng_equal"], rank  # each rank's own generator state
        assert not entry["skipped"]
        # 3 more steps after the restore end bit-identical to the straight run
        assert entry["resume_mismatch"] == [], rank


def _model_chunk_offset(state: dict[str, Any], file: str) -> int:
    for key, tensor in state["tensors"].items():
        for chunk in tensor["chunks"]:
            if key.startswith("model/") and chunk["file"] == file and chunk["length"]:
                return int(chunk["offset"])
    raise AssertionError(f"no model chunk in {file}")


def _damaged_copies(out: Path) -> list[tuple[str, str]]:
    """Copies of the checkpoint whose newest step has a flipped byte, a truncated shard, or a
    deleted shard; each must fall back to step 3."""
    dirs = []
    for kind in ("flipped", "truncated", "deleted"):
        copy = out / kind
        if not copy.exists():
            shutil.copytree(out / "ckpt", copy)
            shard = copy / "step-00000005" / "shard-00001-of-00004.safetensors"
            data = bytearray(shard.read_bytes())
            if kind == "flipped":  # a byte of a model chunk (every restore reads those)
                state = json.loads((shard.parent / "state.json").read_text())
                data[_model_chunk_offset(state, shard.name)] ^= 0x01
                shard.write_bytes(bytes(data))
            elif kind == "truncated":
                shard.write_bytes(bytes(data[:-8]))
            else:
                shard.unlink()
        dirs.append((kind, "ref3.safetensors"))
    return dirs


def test_restore_on_two_ranks_resharded_and_damaged_steps_fall_back(
    saved: tuple[Path, dict[int, Any]],
) -> None:
    out, _ = saved
    dirs = [("ckpt", "ref5.safetensors"), *_damaged_copies(out)]
    results = harness.run(
        "restore_check", 2, {"out": str(out), "dirs": dirs, "explicit": True}
    ).ok()
    for rank, report in results.items():
        assert report["ckpt"]["step"] == 5
        assert report["ckpt"]["mismatch"] == [], rank
        # another world size: the generators are left alone, with a warning
        assert report["ckpt"]["rng_warning"]
        for kind, _ in dirs[1:]:
            entry = report[kind]
            assert entry["step"] == 3, (kind, rank)  # every rank fell back together
            assert entry["mismatch"] == [], (kind, rank)
            assert any("step-00000005" in w for w in entry["skipped"]), (kind, rank)
            # asked for explicitly, the damaged step raises on every rank, nothing changed
            assert entry["explicit"] == "ChecksumMismatchError", (kind, rank)
            assert entry["explicit_untouched"], (kind, rank)
