"""``hash_file``: the content hash of every byte, cached or not, and the page cache left alone.

It reads through :class:`torchkeep.storage.reading.RangeReader`, so an uncached file (written
with direct I/O, or after the cache was dropped) is read with direct I/O and stays uncached;
a file that changes size while it is hashed is hashed to its end, as a plain read would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from tests.test_cache_policy import _evict, _resident_share, direct_dir
from torchkeep.hashing import hash_file
from torchkeep.storage import reading

__all__ = ["direct_dir"]  # the fixture, used by name

SIZES = [0, 1, 4096, 8 << 20, (8 << 20) + 1, 3 * (8 << 20) + 12345]


def _write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cached", [True, False])
def test_hash_file_hashes_every_byte(direct_dir: Path, size: int, cached: bool) -> None:
    path = direct_dir / "blob"
    data = _write(path, size)
    if not cached and size:
        _evict(path)
    assert hash_file(path) == (size, xxhash.xxh3_128(data).hexdigest())


def test_hashing_an_uncached_file_leaves_it_uncached(direct_dir: Path) -> None:
    path = direct_dir / "blob"
    data = _write(path, 3 * (8 << 20) + 12345)
    _evict(path)
    assert hash_file(path)[1] == xxhash.xxh3_128(data).hexdigest()
    assert _resident_share(path) < 0.1  # read with direct I/O, not through the page cache


@pytest.mark.parametrize("change", ["shrinks", "grows"])
@pytest.mark.parametrize("chunks", [1, 4])
def test_a_file_that_changes_size_while_hashed_is_hashed_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str, chunks: int
) -> None:
    # Four chunks are read ahead on threads, one on the calling thread: the same either way.
    path = tmp_path / "blob"
    data = _write(path, (chunks - 1) * (8 << 20) + 12345)
    at = (8 << 20) * (chunks > 1)  # the file is rewritten as this chunk is read
    after = data[: at + 100] if change == "shrinks" else data + b"tail"
    read = reading.RangeReader.read
    rewritten = False

    def changing_read(self: reading.RangeReader, buffers: list[memoryview], offset: int) -> None:
        nonlocal rewritten
        if offset == at and not rewritten:  # another process rewrites the file just as
            path.write_bytes(after)  # this chunk is read (chunks read ahead on threads:
            rewritten = True  # the first may be read before or after, the same bytes)
        read(self, buffers, offset)

    monkeypatch.setattr(reading.RangeReader, "read", changing_read)
    assert hash_file(path) == (len(after), xxhash.xxh3_128(after).hexdigest())
    assert rewritten
