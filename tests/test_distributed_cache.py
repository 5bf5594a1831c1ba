"""The ``cache=`` policy of sharded saves: what a shard file leaves in the page cache.

``TorchkeepStorageWriter(cache=)`` and a distributed ``CheckpointManager(cache=)`` follow the
single-process policies (tests/test_cache_policy.py): ``"keep"`` leaves the shards cached (a
restore right after the save reads memory), ``"drop"`` writes them with direct I/O,
``"auto"`` keeps while the page cache is fast and evicts the previous step once a new one is
committed. Every policy writes the same, complete file. Residency is read with ``mincore``;
skipped where the temporary folder takes no direct I/O (tmpfs caches everything).

The manager runs distributed on a gloo group of one rank (the policy is per rank; the
multi-rank save itself is tested in tests/test_distributed.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import torchkeep as tk
from tests import _dist_harness as harness
from tests._compat import needs_sharded_checkpoints
from tests.conftest import assert_state_equal
from tests.test_cache_policy import (  # noqa: F401 (direct_dir, held_refills: fixtures)
    _HeldRefills,
    _resident_share,
    _wait_until_cached,
    direct_dir,
    held_refills,
)
from tests.test_distributed_staging import spy_mapped
from torchkeep.distributed import (
    NoPickleLoadPlanner,
    TorchkeepStorageReader,
    TorchkeepStorageWriter,
)
from torchkeep.storage import stream

pytestmark = [
    needs_sharded_checkpoints,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]


def _state(rows: int = 3) -> dict[str, torch.Tensor]:
    """``rows`` MiB x 4 and change: several 8 MiB write blocks, so the pipelined writeback
    really runs."""
    torch.manual_seed(5)
    return {"a": torch.randn(rows, 1 << 20), "b": torch.randn(1001), "c": torch.arange(7)}


def _save(path: Path, cache: str, rows: int = 3) -> Path:
    """``dcp.save`` of :func:`_state` in one process; the step's only shard file."""
    writer = TorchkeepStorageWriter(path, cache=cache)  # type: ignore[arg-type]
    dcp.save(_state(rows), storage_writer=writer, no_dist=True)
    (shard,) = path.glob("shard-*.safetensors")
    return shard


@pytest.mark.parametrize("cache", ["keep", "drop", "auto"])
def test_every_policy_writes_the_same_complete_step(direct_dir: Path, cache: str) -> None:  # noqa: F811
    shard = _save(direct_dir / cache / "step-00000001", cache)
    reference = _save(direct_dir / "reference" / "step-00000001", "drop")
    assert shard.read_bytes() == reference.read_bytes()
    assert tk.verify(shard.parent).ok
    target = {k: torch.zeros_like(v) for k, v in _state().items()}
    dcp.load(
        target,
        storage_reader=TorchkeepStorageReader(shard.parent),
        planner=NoPickleLoadPlanner(),
        no_dist=True,
    )
    assert_state_equal(target, _state())


def test_keep_leaves_the_shards_cached_and_drop_leaves_none(
    direct_dir: Path,  # noqa: F811
) -> None:
    kept = _save(direct_dir / "kept" / "step-00000001", "keep")
    dropped = _save(direct_dir / "dropped" / "step-00000001", "drop")
    assert _resident_share(kept) > 0.9
    assert _resident_share(dropped) < 0.1


@pytest.mark.parametrize("slow", [False, True])
def test_auto_keeps_the_shards_cached_while_the_page_cache_is_fast(
    direct_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    held_refills: _HeldRefills,  # noqa: F811
    slow: bool,
) -> None:
    # Pin the bar (the rate is measured on the file's own writes) so the machine does not matter.
    monkeypatch.setattr(stream, "MIN_CACHED_RATE", float("inf") if slow else 0.0)
    shard = _save(direct_dir / "step-00000001", "auto", rows=12)  # 48 MiB: 6 blocks
    if slow:  # the first blocks went through the cache, the rest around it
        measured = stream._MEASURED_BLOCKS * stream.CHUNK_BYTES / shard.stat().st_size
        assert measured - 0.05 < _resident_share(shard) < measured + 0.05
    else:
        assert _resident_share(shard) > 0.9
    # submitted for read-back as soon as written, from the temporary folder renamed since, to
    # be read once found at its committed place
    assert [[path.name for path in paths] for paths in held_refills.submitted] == [[shard.name]]
    assert held_refills.committed_at == [[shard]]


def test_the_writer_reads_its_shard_back_under_auto(
    direct_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream, "MIN_CACHED_RATE", float("inf"))  # the cache counts as slow
    shard = _save(direct_dir / "step-00000001", "auto", rows=12)  # mostly written direct
    assert _wait_until_cached(shard) > 0.9


@pytest.mark.parametrize("bad", ["KEEP", None, True])
def test_the_writer_refuses_an_unknown_policy_before_anything_is_written(
    tmp_path: Path, bad: object
) -> None:
    with pytest.raises(tk.CachePolicyError, match="'keep'"):
        TorchkeepStorageWriter(tmp_path / "step-00000001", cache=bad)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# ---- the distributed manager passes its cache= to the shards -----------------------------


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A gloo process group of world size 1, rendezvous through a file."""
    with harness.one_rank_group(tmp_path_factory.mktemp("dist-cache")):
        yield


def _shards(folder: Path, step: int) -> list[Path]:
    shards = sorted((folder / f"step-{step:08d}").glob("shard-*.safetensors"))
    assert shards
    return shards


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize("cache", ["keep", "drop", "auto"])
def test_a_distributed_manager_writes_its_shards_under_its_cache_policy(
    direct_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    cache: str,
) -> None:
    monkeypatch.setattr(stream, "MIN_CACHED_RATE", 0.0)  # auto: the cache counts as fast
    mgr = tk.CheckpointManager(direct_dir, keep_last=None, distributed=True, cache=cache)  # type: ignore[arg-type]
    assert mgr._session is not None  # distributed on one rank
    torch.manual_seed(6)
    model = nn.Linear(1024, 1024)
    mgr.save(1, model=model)
    first = [_resident_share(p) for p in _shards(direct_dir, 1)]
    mgr.save(2, model=model)
    after = [_resident_share(p) for p in _shards(direct_dir, 1)]
    newest = [_resident_share(p) for p in _shards(direct_dir, 2)]
    if cache == "drop":
        assert max(first + newest) < 0.1
    else:
        assert min(first + newest) > 0.9
        if cache == "keep":  # every step stays cached
            assert min(after) > 0.9
        else:  # auto: only the newest step stays cached
            assert max(after) < 0.1
    fresh = nn.Linear(1024, 1024)
    assert mgr.restore(model=fresh).step == 2
    assert_state_equal(fresh.state_dict(), model.state_dict())


@pytest.mark.usefixtures("group")
def test_auto_reads_the_newest_shards_back_after_a_slow_cache_made_them_direct(
    direct_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream, "MIN_CACHED_RATE", float("inf"))  # the cache counts as slow
    mgr = tk.CheckpointManager(direct_dir, keep_last=None, distributed=True)
    torch.manual_seed(7)
    model = nn.Linear(4096, 3072)  # 48 MiB: six blocks, four of them written direct
    mgr.save(1, model=model)
    mgr.save(2, model=model)
    (first,), (newest,) = _shards(direct_dir, 1), _shards(direct_dir, 2)
    assert _wait_until_cached(newest) > 0.9  # this rank's shard, read back
    assert _resident_share(first) < 0.1  # the step before it: evicted, not read back


# ---- a restore of a cached step hashes and copies from a mapping ---------------------------


@pytest.mark.skipif(os.name != "posix", reason="mapping is used on POSIX systems only")
def test_a_cached_step_with_a_flipped_byte_is_refused_and_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = _save(tmp_path / "step-00000001", "keep")
    mapped = spy_mapped(monkeypatch)
    data = bytearray(shard.read_bytes())
    data[-5000] ^= 0x04  # a byte of tensor "a" (the last bytes are "a", "b", "c" in some order)
    shard.write_bytes(bytes(data))  # in the page cache: written moments ago
    target = {k: torch.full_like(v, 7) for k, v in _state().items()}
    # DCP wraps the error in its CheckpointException (a BaseException)
    with pytest.raises(BaseException, match="'a' do not match their xxh3_128") as caught:
        dcp.load(
            target,
            storage_reader=TorchkeepStorageReader(shard.parent),
            planner=NoPickleLoadPlanner(),
            no_dist=True,
        )
    assert "ChecksumMismatchError" in repr(caught.value)
    assert mapped
    assert all(mapped)  # the hashes were taken from the mapping
    assert all(bool((t == 7).all()) for t in target.values())  # nothing changed
