"""Reading bytes that are not in the page cache: direct or buffered, chosen by measurement
(storage/coldread.py, storage/reading.py, and the restore staging of sharded steps).

The way is pinned through ``coldread.PINNED`` wherever a test needs to know it (a real load's
timings are the machine's, not the test's); the chooser's own choice is tested with injected
timings. Nothing here is timed. Residency is read with ``cachestat`` or ``mincore``
(tests/test_cache_policy.py's helpers) and the tests that depend on it are skipped where the
temporary folder takes no direct I/O (tmpfs keeps everything in memory).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import torch
import xxhash
from torch import nn

import torchkeep as tk
from tests.conftest import assert_state_equal
from tests.test_cache_policy import _big_state, _evict, _resident_share, direct_dir
from torchkeep import ChecksumMismatchError
from torchkeep.checkpoint.distributed import staging
from torchkeep.checkpoint.distributed.staging import ChunkRef, stage, where
from torchkeep.hashing import hash_file
from torchkeep.storage import coldread, reading
from torchkeep.storage.coldread import RECHECK_EVERY, TRIAL_BYTES, ReadChooser

__all__ = ["direct_dir"]  # the fixture, used by name

MiB = 1 << 20
MODES = ["direct", "buffered", None]  # None: measured, as in real use


@pytest.fixture
def pin(monkeypatch: pytest.MonkeyPatch) -> object:
    """``pin(mode)`` makes every unfixed chooser read uncached bytes that way (None: measure)."""

    def pin(mode: coldread.ReadMode | None) -> None:
        monkeypatch.setattr(coldread, "PINNED", mode)

    return pin


def _write(path: Path, data: bytes) -> bytes:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def _model_like(state: dict[str, torch.Tensor]) -> nn.Module:
    model = nn.Module()
    for name, tensor in state.items():
        model.register_buffer(name, torch.zeros_like(tensor))
    return model


# ---- which pages are cached ------------------------------------------------------------


@pytest.mark.parametrize("way", ["cachestat", "mincore"])
def test_residency_tells_cached_from_uncached_ranges(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    path = direct_dir / "f.bin"
    _write(path, os.urandom(3 * MiB + 123))  # a partial last page
    _evict(path)
    with open(path, "rb") as f:  # cache the second MiB only
        f.seek(MiB)
        assert len(f.read(MiB)) == MiB
    fd = os.open(path, os.O_RDONLY)
    try:
        if way == "cachestat" and reading._cached_pages(fd, 0, MiB) is None:
            pytest.skip("this kernel refuses cachestat (Linux < 6.5 or a seccomp filter)")
        if way == "mincore":  # what a kernel without cachestat gets
            monkeypatch.setattr(reading, "_cached_pages", lambda *_: None)
        residency = reading._Residency(fd, os.fstat(fd).st_size)
        try:
            assert residency.cached(MiB, MiB)
            assert residency.cached(MiB + 5, 4000)  # unaligned, inside the cached MiB
            assert residency.cached(2 * MiB - 1, 1)
            assert not residency.cached(MiB, MiB + 1)  # one byte into an uncached page
            assert not residency.cached(MiB - 1, 2)
            assert not residency.cached(0, 3 * MiB + 123)
            assert not residency.cached(3 * MiB, 123)  # the partial last page
            assert residency.cached(4 * MiB, 10)  # past the end: nothing to read
        finally:
            residency.close()
    finally:
        os.close(fd)


# ---- the chooser -----------------------------------------------------------------------


def _finish_trial(chooser: ReadChooser, direct_s: float, buffered_s: float) -> None:
    """Run the trial: TRIAL_BYTES each way, taking the given seconds."""
    assert chooser.pick(TRIAL_BYTES) == "direct"  # direct first: read-ahead cannot help it
    assert chooser.pick(TRIAL_BYTES) == "buffered"
    chooser.record("direct", TRIAL_BYTES, direct_s)
    chooser.record("buffered", TRIAL_BYTES, buffered_s)


@pytest.mark.parametrize(("direct_s", "buffered_s", "faster"), [
    (0.010, 0.004, "buffered"), (0.004, 0.010, "direct"),
])  # fmt: skip
def test_the_chooser_picks_the_faster_way_after_its_trial(
    direct_s: float, buffered_s: float, faster: str
) -> None:
    chooser = ReadChooser()
    _finish_trial(chooser, direct_s, buffered_s)
    assert [chooser.pick(8 * MiB) for _ in range(RECHECK_EVERY - 1)] == [faster] * (
        RECHECK_EVERY - 1
    )


def test_the_trial_counts_bytes_so_small_reads_all_count() -> None:
    chooser = ReadChooser()
    small = TRIAL_BYTES // 4
    assert [chooser.pick(small) for _ in range(8)] == ["direct"] * 4 + ["buffered"] * 4
    assert chooser.pick(small) == "direct"  # nothing timed yet: direct, as before this module


def test_the_chooser_rechecks_the_losing_way_and_follows_a_change() -> None:
    chooser = ReadChooser()
    _finish_trial(chooser, direct_s=0.004, buffered_s=0.010)
    piece = TRIAL_BYTES // 2
    picks = [chooser.pick(piece) for _ in range(RECHECK_EVERY + 2)]
    # the recheck: a new trial of the losing way, TRIAL_BYTES in a row
    assert picks == ["direct"] * (RECHECK_EVERY - 1) + ["buffered"] * 2 + ["direct"]
    for _ in range(3):  # the machine changed: buffered reads are now much faster
        chooser.record("buffered", 8 * MiB, 0.001)
        chooser.record("direct", 8 * MiB, 0.010)
    assert chooser.pick(8 * MiB) == "buffered"


def test_a_fixed_chooser_ignores_the_pin_and_the_timings(pin: object) -> None:
    pin("buffered")  # type: ignore[operator]
    assert ReadChooser().pick(MiB) == "buffered"
    fixed = ReadChooser(fixed="direct")
    picks = [fixed.pick(TRIAL_BYTES) for _ in range(3)]
    fixed.record("buffered", TRIAL_BYTES, 0.0001)
    assert [*picks, fixed.pick(MiB)] == ["direct"] * 4


def test_the_reader_times_its_uncached_reads_into_its_chooser(
    direct_dir: Path, pin: object
) -> None:
    pin(None)  # type: ignore[operator]
    data = _write(direct_dir / "blob", os.urandom(4 * TRIAL_BYTES))
    _evict(direct_dir / "blob")
    records: list[tuple[str, int]] = []

    class Spy(ReadChooser):
        def record(self, mode: coldread.ReadMode, nbytes: int, seconds: float) -> None:
            records.append((mode, nbytes))
            super().record(mode, nbytes, seconds)

    got = bytearray()
    with reading.RangeReader(direct_dir / "blob", chooser=Spy()) as reader:
        for offset in range(0, len(data), TRIAL_BYTES):
            piece = memoryview(bytearray(TRIAL_BYTES))
            reader.read([piece], offset)
            got += piece
    assert bytes(got) == data
    assert records[:2] == [("direct", TRIAL_BYTES), ("buffered", TRIAL_BYTES)]


# ---- the range reader, in every mode ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_unaligned_ranges_are_read_exactly_in_every_mode(
    direct_dir: Path, pin: object, mode: coldread.ReadMode | None
) -> None:
    pin(mode)  # type: ignore[operator]
    data = _write(direct_dir / "blob", os.urandom(3 * reading.BOUNCE_BYTES + 12345))
    _evict(direct_dir / "blob")
    offset = reading.ALIGN + 7  # neither the offset nor the sizes are aligned
    sizes = [1, 4093, reading.BOUNCE_BYTES + 3, 0, 2 * reading.BOUNCE_BYTES - 9000, 11]
    buffers = [memoryview(bytearray(n)) for n in sizes]
    with reading.RangeReader(direct_dir / "blob") as reader:
        reader.read(list(buffers), offset)
    assert b"".join(bytes(b) for b in buffers) == data[offset : offset + sum(sizes)]


@pytest.mark.parametrize("mode", MODES)
def test_aligned_ranges_up_to_the_end_are_read_exactly_in_every_mode(
    direct_dir: Path, pin: object, mode: coldread.ReadMode | None
) -> None:
    pin(mode)  # type: ignore[operator]
    size = 5 * reading.ALIGN + 300  # the last page is partial
    data = _write(direct_dir / "blob", os.urandom(size))
    _evict(direct_dir / "blob")
    memory = memoryview(mmap.mmap(-1, 8 * reading.ALIGN))  # page-aligned, like staging's
    with reading.RangeReader(direct_dir / "blob") as reader:
        reader.read([memory[: size - reading.ALIGN]], reading.ALIGN)
    assert bytes(memory[: size - reading.ALIGN]) == data[reading.ALIGN :]


def test_direct_reads_into_aligned_memory_are_made_in_place(
    direct_dir: Path, pin: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin("direct")  # type: ignore[operator]
    data = _write(direct_dir / "blob", os.urandom(3 * reading.BOUNCE_BYTES))
    _evict(direct_dir / "blob")
    bounced: list[int] = []
    real = reading.RangeReader._bounce

    def spy(self: reading.RangeReader) -> memoryview:
        bounced.append(1)
        return real(self)

    monkeypatch.setattr(reading.RangeReader, "_bounce", spy)
    memory = memoryview(mmap.mmap(-1, 2 * reading.BOUNCE_BYTES))
    with reading.RangeReader(direct_dir / "blob") as reader:
        reader.read([memory], reading.BOUNCE_BYTES)
    assert bytes(memory) == data[reading.BOUNCE_BYTES :]
    assert bounced == []  # no copy through the bounce buffer
    assert _resident_share(direct_dir / "blob") < 0.1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("aligned", [False, True])
def test_a_file_that_ends_early_raises_file_ended_in_every_mode(
    direct_dir: Path, pin: object, mode: coldread.ReadMode | None, aligned: bool
) -> None:
    pin(mode)  # type: ignore[operator]
    _write(direct_dir / "short", b"x" * 10_000)
    _evict(direct_dir / "short")
    memory = memoryview(mmap.mmap(-1, 5 * reading.ALIGN))
    target = memory if aligned else memory[1:]
    with reading.RangeReader(direct_dir / "short") as reader, pytest.raises(reading.FileEndedError):
        reader.read([target], 0)


def test_a_device_that_refuses_the_alignment_is_read_plainly(
    direct_dir: Path, pin: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin("direct")  # type: ignore[operator]
    data = _write(direct_dir / "blob", os.urandom(3 * MiB + 5))
    _evict(direct_dir / "blob")
    with reading.RangeReader(direct_dir / "blob") as reader:
        direct_fd = reader._direct_fd
        real = os.preadv
        direct_calls: list[int] = []

        def refusing(fd: int, buffers: list[memoryview], offset: int) -> int:
            if fd == direct_fd:
                direct_calls.append(offset)
                raise OSError(22, "Invalid argument")  # EINVAL
            return real(fd, buffers, offset)

        monkeypatch.setattr(reading.os, "preadv", refusing)
        first, second = memoryview(bytearray(MiB)), memoryview(bytearray(2 * MiB + 5))
        reader.read([first], 0)
        reader.read([second], MiB)
    assert bytes(first) + bytes(second) == data
    assert len(direct_calls) == 1  # refused once, not asked again


# ---- loads: direct leaves the file uncached, buffered leaves it cached ---------------------


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_loading_a_dropped_file_is_exact_and_leaves_the_cache_as_the_mode_says(
    direct_dir: Path, pin: object, mode: coldread.ReadMode
) -> None:
    pin(mode)  # type: ignore[operator]
    path = direct_dir / "w.safetensors"
    state = _big_state()
    tk.save_weights(state, path, cache="drop")
    assert _resident_share(path) < 0.1
    model = _model_like(state)
    tk.load_weights(model, path)
    assert_state_equal(model.state_dict(), state)
    if mode == "direct":  # read around the page cache: it stays as it was
        assert _resident_share(path) < 0.1
    else:  # read through it: the file is now cached, as the peers leave theirs
        assert _resident_share(path) > 0.9


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_restoring_a_dropped_step_is_exact_and_leaves_the_cache_as_the_mode_says(
    direct_dir: Path, pin: object, mode: coldread.ReadMode
) -> None:
    pin(mode)  # type: ignore[operator]
    mgr = tk.CheckpointManager(direct_dir, cache="drop")
    model = nn.Linear(1024, 1030)
    mgr.save(1, model=model, epoch=1)
    fresh = nn.Linear(1024, 1030)
    assert mgr.restore(model=fresh).extra["epoch"] == 1
    assert_state_equal(fresh.state_dict(), model.state_dict())
    share = _resident_share(direct_dir / "step-00000001" / "model.safetensors")
    assert share < 0.1 if mode == "direct" else share > 0.9


def test_hashing_reads_direct_even_when_loads_are_pinned_buffered(
    direct_dir: Path, pin: object
) -> None:
    pin("buffered")  # type: ignore[operator]
    data = _write(direct_dir / "blob", os.urandom(24 * MiB + 12345))
    _evict(direct_dir / "blob")
    assert hash_file(direct_dir / "blob") == (len(data), xxhash.xxh3_128_hexdigest(data))
    assert _resident_share(direct_dir / "blob") < 0.1  # verify never fills the page cache


# ---- restore staging of sharded steps, in every mode ---------------------------------------


def _ref(name: str, data: bytes, offset: int, length: int, label: str = "t") -> ChunkRef:
    digest = xxhash.xxh3_128_hexdigest(data[offset : offset + length])
    return ChunkRef(name, offset, length, digest, label)


@pytest.mark.parametrize("mode", MODES)
def test_staged_evicted_chunks_come_back_exact_in_every_mode(
    direct_dir: Path, pin: object, monkeypatch: pytest.MonkeyPatch, mode: coldread.ReadMode | None
) -> None:
    pin(mode)  # type: ignore[operator]
    monkeypatch.setattr(staging, "PIECE", 3 * reading.ALIGN)  # many pieces; chunks straddle them
    a = _write(direct_dir / "a", os.urandom(70_001))
    b = _write(direct_dir / "b", os.urandom(9_000))
    chunks = [
        _ref("a", a, 137, 20_000),
        _ref("a", a, 20_137, 3),
        _ref("a", a, 40_000, 30_001),  # up to the file's end
        _ref("b", b, 8, 8_992),
    ]
    for name in ("a", "b"):
        _evict(direct_dir / name)
    got = stage(direct_dir, chunks, {"a": len(a), "b": len(b)})
    for chunk in chunks:
        data = a if chunk.file == "a" else b
        assert bytes(got[where(chunk)].numpy()) == data[chunk.offset : chunk.offset + chunk.length]
    if mode == "direct":
        assert _resident_share(direct_dir / "a") < 0.1
    elif mode == "buffered":
        assert _resident_share(direct_dir / "a") > 0.9


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where_flipped", [0, 8191, 19_999])
def test_a_flipped_byte_in_an_evicted_chunk_is_refused_in_every_mode(
    direct_dir: Path,
    pin: object,
    monkeypatch: pytest.MonkeyPatch,
    mode: coldread.ReadMode | None,
    where_flipped: int,
) -> None:
    pin(mode)  # type: ignore[operator]
    monkeypatch.setattr(staging, "PIECE", 8192)
    a = os.urandom(30_000)
    chunk = _ref("a", a, 500, 20_000, "model/w")
    damaged = bytearray(a)
    damaged[500 + where_flipped] ^= 0x10
    _write(direct_dir / "a", bytes(damaged))
    _evict(direct_dir / "a")
    with pytest.raises(ChecksumMismatchError, match="'model/w'"):
        stage(direct_dir, [chunk], {"a": 30_000})


def test_one_restore_measures_once_for_all_its_files(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[ReadChooser] = []

    class Counted(ReadChooser):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(staging, "ReadChooser", Counted)
    a = _write(direct_dir / "a", os.urandom(9000))
    b = _write(direct_dir / "b", os.urandom(9000))
    stage(direct_dir, [_ref("a", a, 0, 9000), _ref("b", b, 0, 9000)], {"a": 9000, "b": 9000})
    assert len(made) == 1
