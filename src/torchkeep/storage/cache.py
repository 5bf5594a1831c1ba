"""What a save leaves in the operating system's page cache: the ``cache=`` keyword.

Every policy is equally durable (the bytes and the rename are on disk before a save returns);
they differ only in whether the file's pages stay in memory for the next reader:

- ``"keep"``: write through the page cache, starting the disk writes as each 8 MiB block is
  written and waiting for them a few blocks behind, so the final ``fsync`` has little left to do.
  The file stays cached: a load right after the save reads memory, not the disk.
- ``"drop"``: write with direct I/O (large aligned blocks, no page cache). The save is as fast
  as the disk allows and evicts nothing else from memory, but the next load reads the disk.
- ``"auto"`` (the default): the file ends up cached, as with ``"keep"``, without paying for a
  slow page cache during the save. It is written through the cache while the cache takes the
  writes fast, measured on the file's own writes; once it is slower than direct I/O would be
  (below 1 GB/s; on the virtual machines measured here it ran at 0.1-0.4 GB/s, turning a 1 s
  save of 1 GiB into 3-11 s: their host backs a guest page anew, about 10 µs per 4 KiB page,
  whenever the guest touches memory it left unused for a while) the rest is written direct.
  Once the save has committed, two background threads read the file back into the cache
  (:func:`_read_back_halves`), so the load that usually follows reads memory. A shard of a
  sharded step is read back only once the coordinator has committed the step (renamed it into
  place): read earlier, it would compete with the other ranks' writes and slow the save. A
  newer save's read-back replaces an unfinished one, and a process that exits waits at most
  :data:`REFILL_EXIT_WAIT` seconds for it. A file larger than half the memory the system
  reports available is written direct from the start and never read back: it would evict
  everything else and could not stay cached anyway. Checkpoint managers also drop the older
  step's pages from the cache when a new step is committed, so only the newest step (the one a
  restore reads) stays cached.

Loads read the cached part of a file from the cache and the rest direct or buffered, whichever
the load measured faster on its own first reads (:mod:`torchkeep.storage.coldread`): with direct
reads a dropped file loads without filling the cache, with buffered ones it ends cached.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

from ..errors import CachePolicyError
from .stream import WriteMode

CachePolicy = Literal["keep", "drop", "auto"]
CACHE_POLICIES: tuple[CachePolicy, ...] = ("keep", "drop", "auto")
_MEMINFO = Path("/proc/meminfo")
REFILL_STEP = 1 << 20  # bytes per read of the read-back
REFILL_EXIT_WAIT = 5.0  # seconds an exiting process waits for an unfinished read-back
COMMIT_WAIT = 600.0  # seconds a read-back waits for its files' commit before giving up
COMMIT_POLL = 0.01  # seconds between two looks for that commit


def check_cache_policy(cache: object) -> CachePolicy:
    """``cache`` if it names a policy, else :class:`CachePolicyError` listing the choices."""
    if isinstance(cache, str) and cache in CACHE_POLICIES:
        return cache
    raise CachePolicyError(
        f"cache={cache!r} is not a cache policy; pass one of "
        f'{", ".join(repr(p) for p in CACHE_POLICIES)} ("auto", the default, keeps a saved '
        "file in the page cache unless it is larger than half the available memory)"
    )


def available_memory() -> int | None:
    """Bytes of memory the kernel reports available (``MemAvailable``), None where unknown."""
    try:
        with open(_MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _fits(nbytes: int) -> bool:
    """True when ``nbytes`` may stay cached: at most half the memory the system has available."""
    available = available_memory()
    return available is None or nbytes <= available // 2


def write_mode(cache: CachePolicy, nbytes: int) -> WriteMode:
    """How a file of ``nbytes`` saved under ``cache`` is written (:mod:`.stream`)."""
    if cache != "auto":
        return "cached" if cache == "keep" else "direct"
    return "cached-while-fast" if _fits(nbytes) else "direct"


def refill_after_save(
    cache: CachePolicy, paths: Sequence[Path], *, committed_at: Sequence[Path] | None = None
) -> None:
    """Under ``"auto"``, have the just written files ``paths`` read back into the page cache
    in the background (the parts written direct; cached pages cost nothing), unless together
    they exceed half the available memory. A no-op for ``"keep"`` and ``"drop"``.

    The files are opened here, so a rename (a commit) or an unlink after this call changes
    nothing for the read-back.

    Args:
        cache: the save's policy.
        paths: the files just written and fsynced.
        committed_at: for files not committed yet (a rank's shard, whose step the coordinator
            renames into place later), where each will be once committed: the read-back starts
            when every file is found there, and is dropped when one is deleted first (the
            save was aborted) or after :data:`COMMIT_WAIT` seconds.
    """
    if cache != "auto" or not hasattr(os, "preadv"):
        return
    files: list[tuple[int, int]] = []
    places: list[Path] = []
    for path, place in zip(paths, committed_at or paths, strict=True):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            files.append((fd, os.fstat(fd).st_size))
        except OSError:
            os.close(fd)
            continue
        places.append(place)
    if files and _fits(sum(size for _fd, size in files)):
        _refiller.submit(files, None if committed_at is None else places)
    else:
        _close(files)


def wait_for_refill(timeout: float | None = None) -> bool:
    """Wait until no read-back is pending; False if ``timeout`` seconds passed first."""
    return _refiller.wait(timeout)


def _close(files: Iterable[tuple[int, int]]) -> None:
    for fd, _size in files:
        os.close(fd)


class _Refiller:
    """One background thread (and its helper) reading files back into the page cache.

    Only the newest submission matters: a new one makes the thread drop the rest of an older
    one. The thread owns the descriptors it is given and closes each one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # the newest submission not yet taken: its files, and where they are awaited
        self._pending: tuple[list[tuple[int, int]], Sequence[Path] | None] | None = None
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    def submit(
        self, files: list[tuple[int, int]], committed_at: Sequence[Path] | None = None
    ) -> None:
        """Read back ``files`` (``(descriptor, size)`` pairs, closed by the refiller), once
        found at ``committed_at`` when given (see :func:`refill_after_save`)."""
        with self._lock:
            stale, self._pending = self._pending, (files, committed_at)
            self._generation += 1
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="torchkeep-refill", daemon=True
                )
                self._thread.start()
        _close(stale[0] if stale is not None else [])

    def wait(self, timeout: float | None) -> bool:
        return self._idle.wait(timeout)

    def _superseded(self, generation: int) -> bool:
        return generation != self._generation

    def _run(self) -> None:
        while True:
            with self._lock:
                pending, self._pending, generation = self._pending, None, self._generation
                if pending is None:
                    self._thread = None
                    self._idle.set()
                    return
            files, committed_at = pending
            superseded = functools.partial(self._superseded, generation)
            try:
                if committed_at is None or _await_commit(files, committed_at, superseded):
                    _read_back_halves(files, superseded)
            finally:
                _close(files)


def _await_commit(
    files: Sequence[tuple[int, int]], places: Sequence[Path], superseded: Callable[[], bool]
) -> bool:
    """Wait until each file of ``files`` is found at its place in ``places`` (the same inode:
    the step holding it was renamed into place); False when one was deleted first (its save
    was aborted and the temporary folder removed), a newer save superseded this one, or
    :data:`COMMIT_WAIT` seconds passed."""
    deadline = time.monotonic() + COMMIT_WAIT
    while not superseded() and time.monotonic() < deadline:
        try:
            opened = [os.fstat(fd) for fd, _size in files]
        except OSError:
            return False
        if any(stat.st_nlink == 0 for stat in opened):
            return False
        with contextlib.suppress(OSError):
            found = [os.stat(place) for place in places]
            if all(
                (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
                for a, b in zip(opened, found, strict=True)
            ):
                return True
        time.sleep(COMMIT_POLL)
    return False


def _read_back_halves(files: Sequence[tuple[int, int]], superseded: Callable[[], bool]) -> None:
    """Read back the first half of every file on this thread and the second halves on a
    helper thread (daemon, like the refiller: an exiting process does not wait for it beyond
    :data:`REFILL_EXIT_WAIT`). Two readers pay a slow host's first-touch price for the pages
    about twice as fast as one (3 GiB: 3.9 s against 5.5 s measured here)."""
    middles = [min(size, -(-size // 2 // REFILL_STEP) * REFILL_STEP) for _fd, size in files]

    def read(halves: Iterable[tuple[int, int, int]]) -> None:
        for fd, start, end in halves:
            _read_back(fd, start, end, superseded)

    seconds = [(fd, middle, size) for (fd, size), middle in zip(files, middles, strict=True)]
    helper = threading.Thread(target=read, args=(seconds,), name="torchkeep-refill", daemon=True)
    helper.start()
    read((fd, 0, middle) for (fd, _size), middle in zip(files, middles, strict=True))
    helper.join()


def _read_back(fd: int, start: int, end: int, superseded: Callable[[], bool]) -> None:
    """Read bytes ``start`` to ``end`` of the file ``fd`` into the page cache, unless
    ``superseded()`` first.

    Plain sequential reads into one small reused buffer. Reading (not asking for read-ahead
    with ``posix_fadvise(POSIX_FADV_WILLNEED)``, as 0.7.0 did) makes sure every page arrives
    (that read-ahead skips the partial last page a direct write leaves in the cache not up to
    date), lets the kernel's own read-ahead cache the file in large folios (``WILLNEED`` caches
    single pages, which later loads map and copy more slowly: a mapped hash of 1 GiB took
    0.16 s against 0.10 s here, a one-thread read 0.29 s against 0.18 s), and touches every
    page: on virtual machines whose host takes back memory the guest left unused, a page the
    disk filled still costs its first access about 10 µs (about 3 s per GiB measured here),
    which is better spent here, in the background, than in the load that follows.
    """
    buffer = memoryview(bytearray(REFILL_STEP))
    try:
        for offset in range(start, end, REFILL_STEP):
            if superseded():
                return
            if not os.preadv(fd, [buffer[: end - offset]], offset):
                return  # truncated meanwhile: nothing more to read
    except OSError:  # only a hint: nothing is lost when it fails
        pass


def _new_refiller() -> None:
    """A fresh refiller (at import, and after ``fork``: the parent's thread, and whoever held
    its lock, do not exist in the child)."""
    global _refiller
    _refiller = _Refiller()


_refiller: _Refiller
_new_refiller()
atexit.register(lambda: _refiller.wait(REFILL_EXIT_WAIT))
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_refiller)


def drop_cached(paths: Iterable[Path]) -> None:
    """Ask the kernel to evict the (clean, already fsynced) pages of ``paths`` from its cache.

    Only a hint: files that vanished or cannot be opened are skipped, and nothing is written.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
