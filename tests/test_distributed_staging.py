"""The restore staging of sharded steps (checkpoint/distributed/staging.py), in one process:
spans, pieces, direct and cached reads, and every byte hashed before it is handed out."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch
import xxhash

from tests.test_cache_policy import _takes_direct_io
from torchkeep import ChecksumMismatchError
from torchkeep.checkpoint.distributed import staging
from torchkeep.checkpoint.distributed.staging import ChunkRef, stage, where
from torchkeep.storage.coldread import ReadChooser


def _shard(tmp_path: Path, name: str, size: int) -> bytes:
    data = os.urandom(size)
    (tmp_path / name).write_bytes(data)
    return data


def _ref(name: str, data: bytes, offset: int, length: int, label: str = "t") -> ChunkRef:
    digest = xxhash.xxh3_128_hexdigest(data[offset : offset + length])
    return ChunkRef(name, offset, length, digest, label)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("cache", ["cached", "cached-read", "evicted"])
def test_chunks_across_pieces_spans_and_files_come_back_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    monkeypatch.setattr(staging, "PIECE", 8192)  # many pieces; chunks straddle them
    monkeypatch.setattr(staging, "MAP_CACHED", cache != "cached-read")  # cached: mapped
    a = _shard(tmp_path, "a", 70_001)
    b = _shard(tmp_path, "b", 9_000)
    chunks = [
        _ref("a", a, 137, 20_000),  # unaligned, over several pieces
        _ref("a", a, 20_137, 3),  # adjacent: the same span
        _ref("a", a, 20_140, 0),  # empty
        _ref("a", a, 40_000, 30_001),  # after a gap (read, unused), up to the file's end
        _ref("b", b, 8, 8_992),  # another file
        _ref("a", a, 137, 20_000, "again"),  # the same bytes under another name
    ]
    if cache == "evicted":  # read with direct I/O where the file system allows it
        for name in ("a", "b"):
            _evict(tmp_path / name)
    got = stage(tmp_path, chunks, {"a": len(a), "b": len(b)})
    for chunk in chunks:
        data = a if chunk.file == "a" else b
        view = got[where(chunk)]
        assert view.dtype == torch.uint8
        assert bytes(view.numpy()) == data[chunk.offset : chunk.offset + chunk.length]


def test_staging_memory_is_fresh_and_private(tmp_path: Path) -> None:
    a = _shard(tmp_path, "a", 5000)
    chunk = _ref("a", a, 100, 4000)
    first = stage(tmp_path, [chunk], {"a": 5000})[where(chunk)]
    first.zero_()  # the caller's copy: neither the file nor a later read sees it
    second = stage(tmp_path, [chunk], {"a": 5000})[where(chunk)]
    assert bytes(second.numpy()) == a[100:4100]
    assert (tmp_path / "a").read_bytes() == a


@pytest.mark.parametrize("where_flipped", [0, 8191, 8192, 19_999])
def test_a_flipped_byte_anywhere_in_a_chunk_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where_flipped: int
) -> None:
    monkeypatch.setattr(staging, "PIECE", 8192)
    monkeypatch.setattr(staging, "MAP_CACHED", False)  # read, as a span not in the page cache
    a = _shard(tmp_path, "a", 30_000)
    chunk = _ref("a", a, 500, 20_000, "model/w")
    damaged = bytearray(a)
    damaged[500 + where_flipped] ^= 0x10
    (tmp_path / "a").write_bytes(bytes(damaged))
    with pytest.raises(ChecksumMismatchError, match="'model/w'"):
        stage(tmp_path, [chunk], {"a": 30_000})
    assert stage(tmp_path, [chunk], {"a": 30_000}, verify=False)  # read-only mode reads it


def test_missing_resized_and_truncated_files_are_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _shard(tmp_path, "a", 9000)
    chunk = _ref("a", a, 0, 9000)
    with pytest.raises(ChecksumMismatchError, match="missing"):
        stage(tmp_path, [dataclasses.replace(chunk, file="gone")], {"gone": 9000})
    with pytest.raises(ChecksumMismatchError, match="the manifest says 9001"):
        stage(tmp_path, [chunk], {"a": 9001})

    # the file shrinks between the size check and the read
    real = staging._ShardFile.__init__

    def shrink(self: staging._ShardFile, path: Path, expected: int, chooser: ReadChooser) -> None:
        real(self, path, expected, chooser)
        os.truncate(path, 4000)

    monkeypatch.setattr(staging._ShardFile, "__init__", shrink)
    with pytest.raises(ChecksumMismatchError, match="ended early"):
        stage(tmp_path, [chunk], {"a": 9000})


def test_allocate_is_page_aligned_for_direct_io() -> None:
    buffer = staging.allocate(3 << 20)
    assert buffer.numel() == 3 << 20
    assert buffer.dtype == torch.uint8
    assert buffer.data_ptr() % 4096 == 0 or os.name != "posix"
    assert staging.allocate(0).numel() == 0


# ---- spans wholly in the page cache are mapped, not read --------------------------------


def spy_mapped(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, per span, whether :meth:`staging._ShardFile.mapped` mapped it."""
    calls: list[bool] = []
    real = staging._ShardFile.mapped

    def spy(self: staging._ShardFile, low: int, high: int) -> torch.Tensor | None:
        got = real(self, low, high)
        calls.append(got is not None)
        return got

    monkeypatch.setattr(staging._ShardFile, "mapped", spy)
    return calls


@pytest.mark.skipif(os.name != "posix", reason="mapping is used on POSIX systems only")
def test_a_cached_span_is_mapped_and_an_evicted_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _takes_direct_io(tmp_path):
        pytest.skip("the temporary folder takes no direct I/O (tmpfs?): everything is cached")
    calls = spy_mapped(monkeypatch)
    a = _shard(tmp_path, "a", 50_000)
    chunks = [_ref("a", a, 100, 30_000), _ref("a", a, 30_100, 19_900)]
    for cached in (True, False):
        if not cached:
            _evict(tmp_path / "a")  # after the mapping is gone: mapped pages stay cached
        got = stage(tmp_path, chunks, {"a": len(a)})  # first: just written, so cached
        assert calls[-1] is cached
        for chunk in chunks:
            assert bytes(got[where(chunk)].numpy()) == a[chunk.offset : chunk.offset + chunk.length]
        del got
    assert len(calls) == 2


@pytest.mark.skipif(os.name != "posix", reason="mapping is used on POSIX systems only")
def test_a_partly_cached_span_maps_its_cached_chunks_and_reads_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _takes_direct_io(tmp_path):
        pytest.skip("the temporary folder takes no direct I/O (tmpfs?): everything is cached")
    calls = spy_mapped(monkeypatch)
    mib = 1 << 20  # whole 2 MiB ranges, so that large page-cache folios are evicted whole
    a = _shard(tmp_path, "a", 16 * mib)
    chunks = [  # one span: cached, cached, evicted, empty, evicted, cached
        _ref("a", a, 0, 2 * mib),
        _ref("a", a, 2 * mib, 2 * mib),
        _ref("a", a, 4 * mib, 4 * mib),
        _ref("a", a, 8 * mib, 0),
        _ref("a", a, 8 * mib, 2 * mib),
        _ref("a", a, 10 * mib, 6 * mib),
    ]
    fd = os.open(tmp_path / "a", os.O_RDONLY)
    try:  # evict the middle only
        os.fsync(fd)
        os.posix_fadvise(fd, 4 * mib, 6 * mib, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    got = stage(tmp_path, chunks, {"a": len(a)})
    assert calls == [True, False, True]  # three parts, mapped, read, mapped
    for chunk in chunks:
        assert bytes(got[where(chunk)].numpy()) == a[chunk.offset : chunk.offset + chunk.length]


@pytest.mark.skipif(os.name != "posix", reason="mapping is used on POSIX systems only")
@pytest.mark.parametrize("where_flipped", [0, 4095, 4096, 19_999])
def test_a_mapped_span_with_a_flipped_byte_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where_flipped: int
) -> None:
    calls = spy_mapped(monkeypatch)
    a = _shard(tmp_path, "a", 30_000)
    chunks = [_ref("a", a, 0, 500, "model/b"), _ref("a", a, 500, 20_000, "model/w")]
    damaged = bytearray(a)
    damaged[500 + where_flipped] ^= 0x01
    (tmp_path / "a").write_bytes(bytes(damaged))  # cached: written moments ago
    with pytest.raises(ChecksumMismatchError, match="'model/w'"):
        stage(tmp_path, chunks, {"a": 30_000})
    assert calls == [True]


@pytest.mark.skipif(os.name != "posix", reason="mapping is used on POSIX systems only")
def test_mapped_chunks_show_later_writes_to_the_file_and_read_ones_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented trade of mapping (README, "Time of check to time of use"): a write to
    the file between the hash and the copy shows through a mapped chunk. With mapping off
    (as for a span not in the page cache) the staged bytes are the hashed ones."""
    a = _shard(tmp_path, "a", 20_000)
    chunk = _ref("a", a, 0, 20_000)
    mapped = stage(tmp_path, [chunk], {"a": 20_000})[where(chunk)]
    monkeypatch.setattr(staging, "MAP_CACHED", False)
    read = stage(tmp_path, [chunk], {"a": 20_000})[where(chunk)]
    with open(tmp_path / "a", "r+b") as f:  # a writer with access to the step, after the hash
        f.write(b"\xff" * 16)
    assert bytes(read.numpy()) == a
    if sys.platform.startswith("linux"):  # a private mapping shows it until a page is written
        assert bytes(mapped.numpy()[:16]) == b"\xff" * 16
