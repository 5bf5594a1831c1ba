"""The ``cache=`` policies: every one is complete and durable; they differ only in what stays in
the page cache. How an uncached file is read back (direct or buffered, by measurement) is tested
in tests/test_cold_reads.py.

Residency is read with ``cachestat`` or ``mincore`` (through
:class:`torchkeep.storage.reading._Residency`); the tests that depend on it are skipped where the
temporary folder takes no direct I/O (tmpfs keeps everything in memory whatever the policy).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.conftest import assert_state_equal
from tests.test_durability import record
from torchkeep.models import Net
from torchkeep.storage import cache as cache_module
from torchkeep.storage import coldread, reading, stream
from torchkeep.storage.cache import CACHE_POLICIES

POLICIES = list(CACHE_POLICIES)


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Net().state_dict()


def _resident_share(path: Path) -> float:
    """The share of ``path``'s pages that are in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        residency = reading._Residency(fd, size)
        pages = -(-size // reading.ALIGN)
        cached = sum(residency.cached(page * reading.ALIGN, reading.ALIGN) for page in range(pages))
        residency.close()
    finally:
        os.close(fd)
    return cached / pages


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert _resident_share(path) < 0.1


def _takes_direct_io(folder: Path) -> bool:
    probe = folder / ".probe"
    probe.write_bytes(b"x")
    try:
        os.close(os.open(probe, os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    finally:
        probe.unlink()
    return hasattr(os, "O_DIRECT")


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    if not _takes_direct_io(tmp_path):
        pytest.skip("the temporary folder takes no direct I/O (tmpfs?): residency is moot")
    return tmp_path


def _big_state() -> dict[str, torch.Tensor]:
    """Large enough for several 8 MiB staging blocks, so pipelined writeback really runs."""
    torch.manual_seed(3)
    return {"a": torch.randn(3, 1 << 20), "b": torch.randn(777), "c": torch.arange(5)}


# ---- every policy is complete and durable ----------------------------------------------


@pytest.mark.parametrize("cache", POLICIES)
def test_save_weights_is_complete_and_durable_under_every_policy(
    tmp_path: Path, cache: str
) -> None:
    path = tmp_path / "w.safetensors"
    record(tmp_path, lambda: tk.save_weights(_big_state(), path, cache=cache))  # type: ignore[arg-type]
    record(tmp_path, lambda: tk.save_weights(_state(1), path, cache=cache))  # type: ignore[arg-type]
    assert_state_equal(tk.load_state_dict(path), _state(1))
    assert path.stat().st_size == os.path.getsize(path)  # no padding left by direct I/O


@pytest.mark.parametrize("cache", POLICIES)
def test_save_model_is_complete_and_durable_under_every_policy(tmp_path: Path, cache: str) -> None:
    torch.manual_seed(0)
    model = Net()
    record(tmp_path, lambda: tk.save_model(model, tmp_path / "m.bundle", cache=cache))  # type: ignore[arg-type]
    assert tk.verify(tmp_path / "m.bundle").ok
    assert_state_equal(tk.load_model(tmp_path / "m.bundle").state_dict(), model.state_dict())


@pytest.mark.parametrize("cache", POLICIES)
def test_checkpoint_steps_are_complete_and_durable_under_every_policy(
    tmp_path: Path, cache: str
) -> None:
    folder = tmp_path / "ckpt"
    mgr = tk.CheckpointManager(folder, keep_last=2, cache=cache)  # type: ignore[arg-type]
    model = nn.Linear(300, 200)
    folder.mkdir()
    for step in (1, 2, 3):
        record(folder, lambda step=step: mgr.save(step, model=model, epoch=step))  # type: ignore[misc]
    assert mgr.steps == [2, 3]
    for step in mgr.steps:
        assert tk.verify(folder / f"step-{step:08d}").ok
    fresh = nn.Linear(300, 200)
    assert mgr.restore(model=fresh).extra["epoch"] == 3
    assert_state_equal(fresh.state_dict(), model.state_dict())


def test_writes_stay_correct_without_sync_file_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "_sync_file_range", lambda: None)
    path = tmp_path / "w.safetensors"
    record(tmp_path, lambda: tk.save_weights(_big_state(), path, cache="keep"))
    assert_state_equal(tk.load_state_dict(path), _big_state())


# ---- the keyword is validated ----------------------------------------------------------


@pytest.mark.parametrize("bad", ["KEEP", "none", "", None, True, 1, ["keep"]])
def test_an_unknown_cache_policy_is_refused_before_anything_is_written(
    tmp_path: Path, bad: object
) -> None:
    calls = {
        "save_weights": lambda: tk.save_weights(_state(0), tmp_path / "w.safetensors", cache=bad),  # type: ignore[arg-type]
        "save_model": lambda: tk.save_model(Net(), tmp_path / "m.bundle", cache=bad),  # type: ignore[arg-type]
        "CheckpointManager": lambda: tk.CheckpointManager(tmp_path / "c", cache=bad),  # type: ignore[arg-type]
    }
    for name, call in calls.items():
        with pytest.raises(tk.CachePolicyError) as caught:
            call()
        message = str(caught.value)
        assert repr(bad) in message, name
        assert "'keep'" in message, name
        assert "'drop'" in message, name
        assert isinstance(caught.value, ValueError)
    assert list(tmp_path.iterdir()) == []


# ---- what stays in the page cache -------------------------------------------------------


def test_keep_leaves_the_file_cached_and_drop_leaves_none_of_it(direct_dir: Path) -> None:
    kept, dropped = direct_dir / "kept.safetensors", direct_dir / "dropped.safetensors"
    tk.save_weights(_big_state(), kept, cache="keep")
    tk.save_weights(_big_state(), dropped, cache="drop")
    assert _resident_share(kept) > 0.9
    assert _resident_share(dropped) < 0.1
    assert kept.read_bytes() == dropped.read_bytes()  # the same file either way


def test_auto_keeps_unless_the_file_exceeds_half_the_available_memory(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small, large = direct_dir / "small.safetensors", direct_dir / "large.safetensors"
    tk.save_weights(_big_state(), small)  # cache="auto" by default
    assert _resident_share(small) > 0.9
    monkeypatch.setattr(cache_module, "available_memory", lambda: 8 << 20)  # 12 MiB > 4 MiB
    held = _HeldRefills()
    monkeypatch.setattr(cache_module, "_refiller", held)
    tk.save_weights(_big_state(), large)
    assert _resident_share(large) < 0.1
    assert held.submitted == []  # and never read back: it could not stay cached


class _HeldRefills:
    """Stands in for the background read-back: records what a save submitted, reads nothing,
    so a test sees the page cache exactly as the save itself left it."""

    def __init__(self) -> None:
        self.submitted: list[list[Path]] = []
        self.committed_at: list[list[Path] | None] = []

    def submit(self, files: list[tuple[int, int]], committed_at: list[Path] | None = None) -> None:
        """Record the files by their current names (and where they are awaited), and close
        them (the refiller owns them)."""
        self.submitted.append([Path(os.readlink(f"/proc/self/fd/{fd}")) for fd, _size in files])
        self.committed_at.append(None if committed_at is None else list(committed_at))
        for fd, _size in files:
            os.close(fd)

    def wait(self, timeout: float | None) -> bool:
        return True


@pytest.fixture
def held_refills(monkeypatch: pytest.MonkeyPatch) -> _HeldRefills:
    held = _HeldRefills()
    monkeypatch.setattr(cache_module, "_refiller", held)
    return held


def _wait_until_cached(path: Path, deadline: float = 20.0) -> float:
    """The share of ``path`` cached once the read-back finished and its pages arrived (the
    kernel reads them asynchronously after the request), or when ``deadline`` seconds passed."""
    assert cache_module.wait_for_refill(deadline)
    share = _resident_share(path)
    for _ in range(int(deadline * 10)):
        if share == 1.0:
            break
        time.sleep(0.1)
        share = _resident_share(path)
    return share


def _slow_page_cache(monkeypatch: pytest.MonkeyPatch, slow: bool = True) -> None:
    # The rate is measured on the file's own writes; pin the bar so the test does not depend on
    # this machine's speed: nothing is fast enough for an infinite bar, anything is for zero.
    monkeypatch.setattr(stream, "MIN_CACHED_RATE", float("inf") if slow else 0.0)


def _blocks_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(4)
    return {"a": torch.randn(12, 1 << 20), "b": torch.randn(1001)}  # 48 MiB: 6 blocks


@pytest.mark.parametrize("slow", [False, True])
def test_auto_writes_the_rest_direct_once_the_page_cache_is_slow(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, held_refills: _HeldRefills, slow: bool
) -> None:
    _slow_page_cache(monkeypatch, slow)
    state = _blocks_state()
    path = direct_dir / "w.safetensors"
    record(direct_dir, lambda: tk.save_weights(state, path))
    measured = stream._MEASURED_BLOCKS * stream.CHUNK_BYTES / path.stat().st_size
    if slow:  # the first blocks went through the cache, the rest around it
        assert measured - 0.05 < _resident_share(path) < measured + 0.05
    else:
        assert _resident_share(path) > 0.9
    assert held_refills.submitted == [[path]]  # read back once the save has returned
    assert_state_equal(tk.load_state_dict(path), state)  # whole and exact either way


class _BlockClock:
    """Stands in for ``perf_counter`` in :mod:`stream`: the write of block ``k`` into the cache
    takes ``seconds[k]`` (the clock is read once before and once after each write)."""

    def __init__(self, seconds: list[float]) -> None:
        self._seconds = seconds
        self._reads = 0
        self._now = 0.0

    def __call__(self) -> float:
        block, after = divmod(self._reads, 2)
        self._reads += 1
        if after:
            self._now += self._seconds[block]
        return self._now


@pytest.mark.parametrize(
    ("pattern", "cached_blocks"),
    [
        ("fast, then slow for good", 5),  # the two slow blocks 3 and 4 send the rest direct
        ("one slow block among fast ones", 7),  # a single slow block is not a slow cache
    ],
)
def test_auto_judges_the_cache_on_its_latest_blocks(
    direct_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    held_refills: _HeldRefills,
    pattern: str,
    cached_blocks: int,
) -> None:
    # Measured on a VM: the cache took the first ~900 MiB of a file at 3-4 GB/s and the rest at
    # 0.3 GB/s. Slow blocks here are just under the bar, fast ones ten times over it: an average
    # over the whole file so far would still count the cache as fast after 40 slow blocks.
    monkeypatch.setattr(stream, "MIN_CACHED_RATE", 1e9)
    fast, slow = stream.CHUNK_BYTES / 1e10, stream.CHUNK_BYTES / 0.9e9
    seconds = (
        [fast] * 3 + [slow] * 4 if pattern.startswith("fast") else [fast] * 3 + [slow] + [fast] * 3
    )
    monkeypatch.setattr(stream, "perf_counter", _BlockClock(seconds))
    state = _blocks_state()  # 6 full blocks and a short seventh
    path = direct_dir / "w.safetensors"
    tk.save_weights(state, path)
    expected = min(cached_blocks * stream.CHUNK_BYTES, path.stat().st_size) / path.stat().st_size
    assert expected - 0.02 < _resident_share(path) < expected + 0.02
    assert held_refills.submitted == [[path]]
    assert_state_equal(tk.load_state_dict(path), state)


def test_auto_reads_a_file_written_around_a_slow_cache_back_into_it(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow_page_cache(monkeypatch)
    state = _blocks_state()
    path = direct_dir / "w.safetensors"
    tk.save_weights(state, path)  # returns before the read-back is done: no residency here
    assert path.stat().st_size % reading.ALIGN  # a partial last page, the one read-ahead skips
    assert _wait_until_cached(path) == 1.0
    assert_state_equal(tk.load_state_dict(path), state)


def test_the_read_back_reads_every_byte_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading (not only asking for read-ahead) is what touches every page, lets the kernel
    # cache the file in large folios and brings the partial last page up to date.
    assert cache_module.wait_for_refill(20)  # no read-back of an earlier test running
    step = 4096
    monkeypatch.setattr(cache_module, "REFILL_STEP", step)
    path = tmp_path / "f.bin"
    data = os.urandom(10 * step + 123)
    path.write_bytes(data)
    reads: list[tuple[int, int]] = []
    preadv = os.preadv

    def read(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = preadv(fd, buffers, offset)
        assert bytes(buffers[0][:got]) == data[offset : offset + got]
        reads.append((offset, got))
        return got

    monkeypatch.setattr(os, "preadv", read)
    fd = os.open(path, os.O_RDONLY)
    try:
        cache_module._read_back(fd, 0, len(data), lambda: False)
    finally:
        os.close(fd)
    assert [offset for offset, _ in reads] == list(range(0, len(data), step))
    assert sum(got for _, got in reads) == len(data)  # every byte, the partial last page too


def test_the_read_back_splits_each_file_between_two_readers_and_reads_every_byte_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cache_module.wait_for_refill(20)
    monkeypatch.setattr(cache_module, "REFILL_STEP", 4096)
    sizes = [10 * 4096 + 123, 4096, 100, 0]
    contents = [os.urandom(size) for size in sizes]
    files = []
    for index, data in enumerate(contents):
        (tmp_path / str(index)).write_bytes(data)
        fd = os.open(tmp_path / str(index), os.O_RDONLY)
        files.append((fd, len(data)))
    got: dict[int, list[tuple[int, bytes]]] = {fd: [] for fd, _ in files}
    threads: set[str] = set()
    preadv = os.preadv

    def read(fd: int, buffers: list[memoryview], offset: int) -> int:
        count = preadv(fd, buffers, offset)
        got[fd].append((offset, bytes(buffers[0][:count])))
        threads.add(threading.current_thread().name)
        return count

    monkeypatch.setattr(os, "preadv", read)
    try:
        cache_module._read_back_halves(files, lambda: False)
    finally:
        for fd, _ in files:
            os.close(fd)
    for (fd, _), data in zip(files, contents, strict=True):
        pieces = sorted(got[fd])
        assert b"".join(piece for _, piece in pieces) == data  # every byte, once, in place
        assert [offset for offset, _ in pieces] == list(range(0, len(data), 4096))
    assert len(threads) == 2  # the second half of the large file on the helper thread


def test_a_newer_save_stops_an_older_read_back(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(8 * cache_module.REFILL_STEP))
    asked = 0

    def superseded() -> bool:  # a newer save arrives while the third piece is due
        nonlocal asked
        asked += 1
        return asked > 2

    fd = os.open(path, os.O_RDONLY)
    try:
        cache_module._read_back(fd, 0, path.stat().st_size, superseded)
    finally:
        os.close(fd)
    assert asked == 3  # asked before each read; gave up at the first "superseded"


class _ReadSpy:
    """Records the read-back's reads, and every look at ``place`` (the file's committed name)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, place: Path) -> None:
        self.reads: list[int] = []
        self.looks = 0
        self.looked = threading.Event()
        preadv, stat = os.preadv, os.stat

        def read(fd: int, buffers: list[memoryview], offset: int) -> int:
            self.reads.append(offset)
            return preadv(fd, buffers, offset)

        def look(path: object, *args: object, **kwargs: object) -> os.stat_result:
            if path == place:
                self.looks += 1
                if self.looks >= 3:
                    self.looked.set()
            return stat(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "preadv", read)
        monkeypatch.setattr(os, "stat", look)


def _uncommitted(tmp_path: Path) -> tuple[Path, Path]:
    """A written file in a temporary step folder, and where it will be once committed."""
    assert cache_module.wait_for_refill(20)  # no read-back of an earlier test running
    (tmp_path / ".step-1.tmp").mkdir()
    written = tmp_path / ".step-1.tmp" / "shard.safetensors"
    written.write_bytes(os.urandom(3 * cache_module.REFILL_STEP + 5))
    return written, tmp_path / "step-1" / written.name


def test_a_shard_is_read_back_only_once_its_step_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rank's shard is written into the step's temporary folder; reading it back before the
    # coordinator renames the folder into place would slow the other ranks' writes.
    written, place = _uncommitted(tmp_path)
    spy = _ReadSpy(monkeypatch, place)
    cache_module.refill_after_save("auto", [written], committed_at=[place])
    assert spy.looked.wait(20)  # the read-back looked for the commit three times ...
    assert spy.reads == []  # ... and read nothing meanwhile
    (tmp_path / ".step-1.tmp").rename(tmp_path / "step-1")  # the commit
    assert cache_module.wait_for_refill(20)
    assert sorted(spy.reads) == [0, 1 << 20, 2 << 20, 3 << 20]  # then every byte


@pytest.mark.parametrize("outcome", ["aborted", "never committed"])
def test_a_read_back_waiting_for_a_commit_is_dropped_when_none_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    written, place = _uncommitted(tmp_path)
    spy = _ReadSpy(monkeypatch, place)
    if outcome == "never committed":
        monkeypatch.setattr(cache_module, "COMMIT_WAIT", 0.2)
    cache_module.refill_after_save("auto", [written], committed_at=[place])
    assert spy.looked.wait(20)
    if outcome == "aborted":  # the coordinator removed the temporary folder
        written.unlink()
    assert cache_module.wait_for_refill(20)  # given up long before COMMIT_WAIT (600 s)
    assert spy.reads == []


@pytest.mark.parametrize("cache", ["keep", "drop"])
def test_only_auto_reads_files_back(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, held_refills: _HeldRefills, cache: str
) -> None:
    _slow_page_cache(monkeypatch)
    tk.save_weights(_blocks_state(), direct_dir / "w.safetensors", cache=cache)  # type: ignore[arg-type]
    mgr = tk.CheckpointManager(direct_dir / "ckpt", cache=cache)  # type: ignore[arg-type]
    mgr.save(1, model=nn.Linear(64, 64))
    tk.save_model(Net(), direct_dir / "bundle", cache=cache)  # type: ignore[arg-type]
    assert held_refills.submitted == []


def test_a_bundle_and_a_checkpoint_step_are_read_back_under_auto(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, held_refills: _HeldRefills
) -> None:
    _slow_page_cache(monkeypatch)
    bundle = tk.save_model(Net(), direct_dir / "bundle")
    mgr = tk.CheckpointManager(direct_dir / "ckpt", save_rng=False)
    mgr.save(1, model=nn.Linear(64, 64), optimizer_state={"lr": 0.1})
    step = direct_dir / "ckpt" / "step-00000001"
    assert held_refills.submitted == [
        [bundle / "model.safetensors"],
        sorted(step.glob("*.safetensors")),
    ]
    assert held_refills.submitted[1]  # the step has tensor files to read back


@pytest.mark.parametrize("slow", [False, True])
def test_auto_checkpoints_keep_only_the_newest_step_cached(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, slow: bool
) -> None:
    _slow_page_cache(monkeypatch, slow)  # slow: written mostly direct, then read back
    mgr = tk.CheckpointManager(direct_dir, keep_last=None)
    model = nn.Linear(4096, 3072)  # 48 MiB: 6 blocks
    mgr.save(1, model=model)
    first = direct_dir / "step-00000001" / "model.safetensors"
    assert _wait_until_cached(first) > 0.9
    mgr.save(2, model=model)
    assert _resident_share(first) < 0.1  # evicted once a newer step is committed
    assert _wait_until_cached(direct_dir / "step-00000002" / "model.safetensors") > 0.9
    assert _resident_share(first) < 0.1  # and not read back with it


def test_keep_checkpoints_leave_every_step_cached(direct_dir: Path) -> None:
    mgr = tk.CheckpointManager(direct_dir, keep_last=None, cache="keep")
    model = nn.Linear(1024, 1024)
    mgr.save(1, model=model)
    mgr.save(2, model=model)
    assert _resident_share(direct_dir / "step-00000001" / "model.safetensors") > 0.9


# ---- reading an uncached file (the ways it is read: tests/test_cold_reads.py) ---------------


@pytest.mark.parametrize("mode", ["direct", "buffered", None])
def test_a_truncated_weights_file_is_refused_by_torchkeep(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str | None
) -> None:
    monkeypatch.setattr(coldread, "PINNED", mode)  # None: measured
    path = direct_dir / "w.safetensors"
    tk.save_weights(_big_state(), path, cache="drop")
    header = tk.load_state_dict(path)  # valid as written
    assert set(header) == {"a", "b", "c"}
    model = nn.Module()
    for name, tensor in _big_state().items():
        model.register_buffer(name, torch.zeros_like(tensor))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4096)
    with pytest.raises(tk.CorruptFileError):
        tk.load_weights(model, path)


@pytest.mark.parametrize("mode", ["direct", "buffered", None])
def test_a_corrupted_uncached_step_is_refused(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str | None
) -> None:
    monkeypatch.setattr(coldread, "PINNED", mode)  # None: measured
    mgr = tk.CheckpointManager(direct_dir, cache="drop")
    mgr.save(1, model=nn.Linear(1024, 1024))
    path = direct_dir / "step-00000001" / "model.safetensors"
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 100)
        f.write(b"\xff" * 8)
        f.flush()
        os.fsync(f.fileno())
    _evict(path)
    with (
        pytest.warns(UserWarning, match="does not match its xxh3_128 hash"),
        pytest.raises(tk.CheckpointNotFoundError),  # the only step fails its hash
    ):
        mgr.restore(model=nn.Linear(1024, 1024))
