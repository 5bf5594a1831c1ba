"""Read byte ranges of a file into memory: from the page cache where cached, else from the disk.

A range that is in the page cache is read with plain ``preadv``: a memory copy. A range that is
not (the page cache was dropped, or the save wrote it with ``cache="drop"``) is read the way a
:class:`~torchkeep.storage.coldread.ReadChooser` picks, by timing the file's own first uncached
reads both ways: with direct I/O (large aligned reads, straight into the caller's memory where
it and the offset are page-aligned, else through a page-aligned bounce buffer; the page cache is
left as it was), or buffered (plain reads, with read-ahead; **the bytes read stay in the page
cache**, so the file ends up cached, as the peers leave theirs). Which pages are cached is asked
of the kernel per read: with ``cachestat`` (Linux 6.5 and later: one count per range, about
0.04 ms for 1 GiB), else with ``mincore`` on a mapping of the file that is never touched (one
lookup per page, about 7 ms for 1 GiB). Where direct I/O or both calls are missing (macOS,
tmpfs) plain reads do everything.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import sys
import threading
import time
from types import TracebackType
from typing import Any

from .coldread import ReadChooser

ALIGN = mmap.PAGESIZE
BOUNCE_BYTES = 8 << 20  # per reading thread
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_MAP_FAILED = ctypes.c_void_p(-1).value
_MISSING = b"\x00"
_RESIDENT_BIT = bytes(flag & 1 for flag in range(256))  # mincore: bit 0 set = page cached
_CACHESTAT = 451  # the same number on every Linux architecture (since 6.5)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


@functools.cache
def _libc() -> Any:
    """The C library with ``mmap``/``mincore``/``munmap`` typed, or None where unusable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_int64,
        ]  # fmt: skip
        libc.mmap.restype = ctypes.c_void_p
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        return None
    return libc


def _cached_pages(fd: int, start: int, nbytes: int) -> int | None:
    """How many pages of ``[start, start + nbytes)`` (``nbytes`` > 0) are in the page cache, by
    ``cachestat``; None where the kernel (or a seccomp filter) refuses it."""
    libc = _libc()
    if libc is None or sys.platform != "linux":
        return None
    counts = _Cachestat()
    span = _CachestatRange(start, nbytes)
    if libc.syscall(_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(counts), 0) != 0:
        return None
    return int(counts.cache)


class _Residency:
    """Answers "are these bytes of the file in the page cache?" without reading them."""

    def __init__(self, fd: int, size: int) -> None:
        self._libc = _libc()
        self._fd = fd
        self._size = size
        self._address: int | None = None
        self._counts = size > 0 and _cached_pages(fd, 0, size) is not None
        if self._libc is not None and size > 0 and not self._counts:
            address = self._libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address not in (None, _MAP_FAILED):
                self._address = address

    def cached(self, offset: int, nbytes: int) -> bool:
        """True when every page of ``[offset, offset + nbytes)`` is cached (or it is unknown)."""
        start = offset - offset % ALIGN
        end = min(offset + nbytes, self._size)
        if end <= start:
            return True
        pages = -(-(end - start) // ALIGN)
        if self._counts:
            counted = _cached_pages(self._fd, start, end - start)
            return counted is None or counted >= pages
        if self._address is None:
            return True
        vector = ctypes.create_string_buffer(pages)
        if self._libc.mincore(self._address + start, end - start, vector) != 0:
            return True
        return _MISSING not in vector.raw.translate(_RESIDENT_BIT)

    def close(self) -> None:
        if self._address is not None:
            self._libc.munmap(self._address, self._size)
            self._address = None


class FileEndedError(EOFError):
    """The file is shorter than a read needs (it was truncated while being read)."""


def _advance(buffers: list[memoryview], count: int) -> list[memoryview]:
    """``buffers`` without their first ``count`` bytes."""
    index = 0
    while index < len(buffers) and count >= len(buffers[index]):
        count -= len(buffers[index])
        index += 1
    rest = buffers[index:]
    if rest and count:
        rest[0] = rest[0][count:]
    return rest


def _in_place(view: memoryview, offset: int) -> int:
    """How many leading bytes of ``view`` direct I/O can read into in place: its whole pages
    when both ``view`` and the file ``offset`` are page-aligned, else 0 (use a bounce buffer)."""
    whole = len(view) - len(view) % ALIGN
    if offset % ALIGN or not whole:
        return 0
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):  # read-only or not contiguous: bounce
        return 0
    return whole if address % ALIGN == 0 else 0


class RangeReader:
    """Reads ranges of one file into caller memory; safe to use from several threads at once.

    Args:
        path: the file.
        chooser: decides how uncached ranges are read (share one between the files of one load
            to measure once); default: a fresh one for this file, measuring both ways.

    Example:
        >>> with RangeReader(path) as reader:
        ...     reader.read([memoryview(bytearray(16))], offset=8)
    """

    def __init__(self, path: str | os.PathLike[str], *, chooser: ReadChooser | None = None) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # buffered reads of uncached ranges: wider read-ahead
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._direct_fd: int | None = None
        if _O_DIRECT:
            with contextlib.suppress(OSError):  # tmpfs and some others refuse O_DIRECT
                self._direct_fd = os.open(path, os.O_RDONLY | _O_DIRECT)
        self._direct_refused = False
        self._chooser = chooser if chooser is not None else ReadChooser()
        self._residency = _Residency(self._fd, os.fstat(self._fd).st_size)
        self._local = threading.local()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._residency.close()
        os.close(self._fd)
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def cached(self, offset: int, nbytes: int) -> bool:
        """True when ``[offset, offset + nbytes)`` is wholly in the page cache (or unknown)."""
        return self._residency.cached(offset, nbytes)

    def read(self, buffers: list[memoryview], offset: int) -> None:
        """Fill ``buffers`` (writable byte views) with the file's bytes from ``offset`` on.

        Raises:
            FileEndedError: the file ends before the buffers are full.
        """
        nbytes = sum(len(buffer) for buffer in buffers)
        if self._direct_fd is None or self._direct_refused or self.cached(offset, nbytes):
            self._read_plain(buffers, offset)
            return
        mode = self._chooser.pick(nbytes)
        began = time.perf_counter()
        if mode == "direct":
            rest, at = self._read_direct(buffers, offset)
            if rest:  # alignment this device refuses: plain reads finish (and do from now on)
                self._read_plain(rest, at)
                return
        else:
            self._read_plain(buffers, offset)
        self._chooser.record(mode, nbytes, time.perf_counter() - began)

    def _read_plain(self, buffers: list[memoryview], offset: int) -> None:
        while buffers:
            got = os.preadv(self._fd, buffers, offset)
            if got == 0:
                raise FileEndedError(offset)
            buffers, offset = _advance(buffers, got), offset + got

    def _bounce(self) -> memoryview:
        bounce: memoryview | None = getattr(self._local, "bounce", None)
        if bounce is None:
            bounce = self._local.bounce = memoryview(mmap.mmap(-1, BOUNCE_BYTES))
        return bounce

    def _read_direct(self, buffers: list[memoryview], offset: int) -> tuple[list[memoryview], int]:
        """Read with aligned direct I/O: whole pages straight into a page-aligned buffer, the
        rest through this thread's bounce buffer (no more of it than is wanted), copied into
        place. Returns what is left unread (nothing, unless the device refused the alignment)."""
        assert self._direct_fd is not None
        remaining = sum(len(buffer) for buffer in buffers)
        while buffers:
            in_place = _in_place(buffers[0], offset)
            start = offset - offset % ALIGN
            if in_place:
                target = buffers[0][:in_place]
            else:
                wanted = offset - start + remaining
                target = self._bounce()[: min(BOUNCE_BYTES, -(-wanted // ALIGN) * ALIGN)]
            try:
                got = os.preadv(self._direct_fd, [target], start)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_refused = True
                return buffers, offset
            if got <= offset - start:
                raise FileEndedError(offset)
            if in_place:
                buffers, offset, remaining = _advance(buffers, got), offset + got, remaining - got
                continue
            available = target[offset - start : got]
            while buffers and available:
                n = min(len(buffers[0]), len(available))
                buffers[0][:n] = available[:n]
                available = available[n:]
                buffers, offset, remaining = _advance(buffers, n), offset + n, remaining - n
        return buffers, offset
