"""Content hashes for manifests.

The hash is XXH3-128: it detects corruption (flipped bits, truncation, stale files) at ~13 GB/s on
one core here, so hashing costs a few percent of a durable save. It is not a defence against
an attacker who can rewrite both a file and its manifest; nothing stored beside the data can be.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import xxhash

from .storage.coldread import ReadChooser
from .storage.reading import FileEndedError, RangeReader

HASH_ALGORITHM = "xxh3_128"
_READ_CHUNK = 8 << 20
_READERS = 2  # threads reading ahead (preadv releases the GIL)
_IN_FLIGHT = 4  # chunks read ahead of the hash: 32 MiB, plus one 8 MiB bounce buffer per thread


class Hasher(Protocol):
    """The incremental hashing interface used by writers."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher() -> Hasher:
    """Return a fresh incremental hasher for :data:`HASH_ALGORITHM`."""
    hasher: Hasher = xxhash.xxh3_128()
    return hasher


def hash_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Return ``(size, hexdigest)`` of the file at ``path``, read in chunks.

    The chunks are read by :class:`~torchkeep.storage.reading.RangeReader`, two threads ahead
    of the hash (a file of one chunk is read on the calling thread): from the page cache where
    the file is cached, else always with direct I/O (pinned, not measured: checking a file,
    e.g. for ``verify``, leaves the page cache as it was, whichever way loads would read it on
    this machine). Bytes past the size the file had when it was opened (it grew, or shrank,
    while being hashed) are read plainly, so the result covers whatever the file held up to its
    end, as a plain read would.
    """
    hasher = new_hasher()
    with (
        open(path, "rb", buffering=0) as f,
        RangeReader(path, chooser=ReadChooser(fixed="direct")) as reader,
    ):
        size = os.fstat(f.fileno()).st_size
        chunks = -(-size // _READ_CHUNK)
        buffers = [
            memoryview(mmap.mmap(-1, _READ_CHUNK)) for _ in range(max(1, min(chunks, _IN_FLIGHT)))
        ]
        position = _hash_range(reader, hasher, buffers, size)
        f.seek(position)
        while n := f.readinto(buffers[0]):
            hasher.update(buffers[0][:n])
            position += n
    return position, hasher.hexdigest()


def _hash_range(reader: RangeReader, hasher: Hasher, buffers: list[memoryview], size: int) -> int:
    """Hash the file's first ``size`` bytes in order, reading up to ``len(buffers)`` chunks
    ahead (on reader threads when there is more than one chunk); return ``size``, or where the
    file ended early (the start of the chunk it cut)."""
    offsets = range(0, size, _READ_CHUNK)

    def read(index: int) -> memoryview:
        chunk = buffers[index % len(buffers)][: min(_READ_CHUNK, size - offsets[index])]
        reader.read([chunk], offsets[index])
        return chunk

    pool = ThreadPoolExecutor(_READERS) if len(offsets) > 1 else None
    with pool if pool is not None else contextlib.nullcontext():
        submit = pool.submit if pool is not None else _run_now
        pending: collections.deque[Future[memoryview]] = collections.deque(
            submit(read, index) for index in range(min(len(buffers), len(offsets)))
        )
        for index in range(len(offsets)):
            try:
                chunk = pending.popleft().result()
            except FileEndedError:  # it shrank while being read: the caller reads on plainly
                for future in pending:
                    future.cancel()
                return offsets[index]  # leaving the pool waits for reads still running
            hasher.update(chunk)  # only then may this buffer take the next chunk
            if index + len(buffers) < len(offsets):
                pending.append(submit(read, index + len(buffers)))
    return size


def _run_now(call: Callable[[int], memoryview], index: int) -> Future[memoryview]:
    """``call(index)`` run on this thread, as a finished future (a pool's ``submit`` without
    the pool, for a file of one chunk)."""
    future: Future[memoryview] = Future()
    try:
        future.set_result(call(index))
    except FileEndedError as exc:
        future.set_exception(exc)
    return future
