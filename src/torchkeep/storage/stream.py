"""Write a sequence of byte views to a file fast, hashing them on the way.

The bytes are copied into a few page-aligned 8 MiB staging buffers, hashed there while
cache-hot, and written by a second thread while the next buffer fills. Three ways to write,
chosen by the caller's cache policy (:mod:`torchkeep.storage.cache`):

- ``"direct"``: ``O_DIRECT`` writes of large aligned blocks reach 1.1-2 GB/s on the virtual
  disks measured here and leave nothing in the page cache. The last block is padded to the
  alignment and the file truncated to its real size. Where the filesystem refuses direct I/O
  (tmpfs, some network filesystems) the same code writes through the page cache.
- ``"cached"``: through the page cache; each block's writeback is started as soon as it is
  written (``sync_file_range``) and waited for a few blocks later, so dirty pages never pile up
  and the caller's ``fsync`` finds little left to write, while the file stays cached for the
  next reader.
- ``"cached-while-fast"``: ``"cached"`` as long as the page cache takes the blocks at
  :data:`MIN_CACHED_RATE` or faster, measured on this file's own latest blocks; once it is
  slower (on the virtual machines measured here, filling the page cache ran at 0.1-0.4 GB/s,
  several times slower than direct I/O) the rest of the file is written ``"direct"``. The rate
  is that of the last :data:`_MEASURED_BLOCKS` blocks, not of the whole file so far: there the
  cache often took the first hundreds of MiB at 3-4 GB/s and then, once the free memory the
  host still backed was used up, 0.3 GB/s, which an average over the whole file noticed too late
  or never.

Durability comes from the caller's ``fsync`` in every mode, which also flushes the device cache
and the file's metadata.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import perf_counter
from typing import Literal

from ..hashing import Hasher

Span = tuple[int, int]
"""``(address, nbytes)`` of memory to write; valid until the producer yields the next span."""

ALIGN = mmap.PAGESIZE
CHUNK_BYTES = 8 << 20
DEPTH = 3  # staging buffers: one filling, up to two queued for the writer thread
WRITEBACK_LAG = 4  # cached writes: wait for a block's writeback this many blocks later
MIN_CACHED_RATE = 1e9  # bytes/s: "cached-while-fast" goes direct when the cache is slower
_MEASURED_BLOCKS = 2  # ... judged on the rate of this many latest blocks
WriteMode = Literal["direct", "cached", "cached-while-fast"]
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_START = _SYNC_FILE_RANGE_WRITE
_FINISH = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER


def enable_direct_io(fd: int) -> None:
    """Ask for direct I/O on ``fd``; stay buffered where the system does not support it."""
    if _O_DIRECT:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux ``sync_file_range`` from the C library, None where there is none (macOS)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


class _Writeback:
    """Pipelined writeback of a file written through the page cache, block by block.

    Only a speed-up: where ``sync_file_range`` is missing or refused, the blocks stay dirty and
    the caller's ``fsync`` writes them all, as it would anyway. With ``while_fast`` it also
    times the writes into the cache and says when they fall below :data:`MIN_CACHED_RATE`.
    """

    def __init__(self, fd: int, *, while_fast: bool) -> None:
        self._fd = fd
        self._call = _sync_file_range()
        self._started: collections.deque[tuple[int, int]] = collections.deque()
        self._while_fast = while_fast
        self._latest: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=_MEASURED_BLOCKS
        )  # (bytes, seconds) of the latest blocks written into the cache

    def _range(self, offset: int, nbytes: int, flags: int) -> None:
        if self._call is not None and self._call(self._fd, offset, nbytes, flags) != 0:
            self._call = None  # refused (EINVAL, ESPIPE on a pipe...): leave it to fsync

    def write(self, view: memoryview, offset: int) -> bool:
        """Write ``view`` at ``offset`` through the cache, start its writeback and wait for the
        block ``WRITEBACK_LAG`` ago; False when later blocks should go direct instead."""
        start = perf_counter()
        _pwrite_all(self._fd, view, offset)
        self._latest.append((len(view), perf_counter() - start))
        self._range(offset, len(view), _START)
        self._started.append((offset, len(view)))
        if len(self._started) > WRITEBACK_LAG:
            self._range(*self._started.popleft(), _FINISH)
        return not (self._while_fast and self._cache_is_slow())

    def _cache_is_slow(self) -> bool:
        """True when the latest :data:`_MEASURED_BLOCKS` blocks went into the cache slower
        than :data:`MIN_CACHED_RATE`."""
        if len(self._latest) < _MEASURED_BLOCKS:
            return False
        written = sum(nbytes for nbytes, _seconds in self._latest)
        return written < MIN_CACHED_RATE * sum(seconds for _nbytes, seconds in self._latest)


def _drop_direct_io(fd: int) -> bool:
    """Switch ``fd`` to buffered writes; False if it was not using direct I/O."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not _O_DIRECT or not flags & _O_DIRECT:
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
    return True


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        try:
            written = os.pwrite(fd, view, offset)
        except OSError as exc:
            if exc.errno == errno.EINVAL and _drop_direct_io(fd):
                continue  # the filesystem takes no direct I/O of this size: go buffered
            raise
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        offset += written


@dataclass(frozen=True)
class _Staging:
    """A page-aligned anonymous map (direct I/O needs alignment) and its address."""

    view: memoryview
    address: int

    @classmethod
    def allocate(cls) -> _Staging:
        region = mmap.mmap(-1, CHUNK_BYTES)
        return cls(memoryview(region), ctypes.addressof(ctypes.c_char.from_buffer(region)))


class _WriterThread:
    """Writes filled staging buffers in order on its own thread and hands each back when done."""

    def __init__(self, fd: int, writeback: _Writeback | None) -> None:
        self._fd = fd
        self._writeback = writeback
        self._todo: queue.SimpleQueue[tuple[_Staging, int, int] | None] = queue.SimpleQueue()
        self._free: queue.SimpleQueue[_Staging | BaseException] = queue.SimpleQueue()
        for _ in range(DEPTH):
            self._free.put(_Staging.allocate())
        self._thread = threading.Thread(target=self._run, name="torchkeep-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._todo.get()) is not None:
            buffer, fill, offset = job
            try:
                if self._writeback is None:
                    # Direct I/O writes whole aligned blocks: the last, short one is padded
                    # (and the file truncated later).
                    _pwrite_all(self._fd, buffer.view[: -(-fill // ALIGN) * ALIGN], offset)
                elif not self._writeback.write(buffer.view[:fill], offset):
                    self._writeback = None  # the cache is slow here: the rest goes direct
                    enable_direct_io(self._fd)  # blocks start at multiples of CHUNK_BYTES
            except BaseException as exc:  # handed to the producer by free_buffer()
                self._free.put(exc)
                return
            self._free.put(buffer)

    def free_buffer(self) -> _Staging:
        """A buffer to fill next (waits for a write to finish); raises a failed write's error."""
        item = self._free.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def write(self, buffer: _Staging, fill: int, offset: int) -> None:
        """Queue the first ``fill`` bytes of ``buffer`` for writing at ``offset``."""
        self._todo.put((buffer, fill, offset))

    def finish(self) -> None:
        """Wait for every queued write; afterwards :meth:`collect` raises any write's error."""
        self._todo.put(None)
        self._thread.join()

    def collect(self) -> None:
        """Take back every buffer, raising the error of a write that failed."""
        for _ in range(DEPTH - 1):
            self.free_buffer()


def write_stream(
    fd: int, spans: Iterable[Span], hasher: Hasher | None = None, *, mode: WriteMode = "direct"
) -> int:
    """Write the memory of ``spans`` one after another from offset 0 of the empty file ``fd``.

    Each span is copied into a staging buffer before the next is requested, so a producer may
    free the memory behind a span once it yields the next one. ``hasher`` sees every byte. The
    file ends exactly after the last byte. ``mode`` says whether the bytes go through the page
    cache (see the module's documentation).

    Returns:
        The number of bytes written.
    """
    writeback = None
    if mode == "direct":
        enable_direct_io(fd)
    else:
        writeback = _Writeback(fd, while_fast=mode == "cached-while-fast")
    writer = _WriterThread(fd, writeback)
    buffer = writer.free_buffer()
    fill = offset = 0

    def flush() -> None:
        nonlocal buffer, fill, offset
        if hasher is not None:
            hasher.update(buffer.view[:fill])
        writer.write(buffer, fill, offset)
        offset += fill
        buffer, fill = writer.free_buffer(), 0

    try:
        for address, size in spans:
            if fill + size < CHUNK_BYTES:  # the common case for small tensors: one copy
                ctypes.memmove(buffer.address + fill, address, size)
                fill += size
                continue
            position = 0
            while position < size:
                n = min(size - position, CHUNK_BYTES - fill)
                ctypes.memmove(buffer.address + fill, address + position, n)
                fill, position = fill + n, position + n
                if fill == CHUNK_BYTES:
                    flush()
        if fill:
            flush()
    finally:
        writer.finish()
    writer.collect()
    os.ftruncate(fd, offset)
    return offset
