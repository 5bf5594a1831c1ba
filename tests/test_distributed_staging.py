"""The restore staging of sharded steps (checkpoint/distributed/staging.py), in one process:
spans, pieces, direct and cached reads, and every byte hashed before it is handed out."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import xxhash

from torchkeep import ChecksumMismatchError
from torchkeep.checkpoint.distributed import staging
from torchkeep.checkpoint.distributed.staging import ChunkRef, stage, where


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
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("cache", ["cached", "evicted"])
def test_chunks_across_pieces_spans_and_files_come_back_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    monkeypatch.setattr(staging, "PIECE", 8192)  # many pieces; chunks straddle them
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

    def shrink(self: staging._ShardFile, path: Path, expected: int) -> None:
        real(self, path, expected)
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
