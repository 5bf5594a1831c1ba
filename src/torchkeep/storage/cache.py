"""What a save leaves in the operating system's page cache: the ``cache=`` keyword.

Every policy is equally durable (the bytes and the rename are on disk before a save returns);
they differ only in whether the file's pages stay in memory for the next reader:

- ``"keep"``: write through the page cache, starting the disk writes as each 8 MiB block is
  written and waiting for them a few blocks behind, so the final ``fsync`` has little left to do.
  The file stays cached: a load right after the save reads memory, not the disk.
- ``"drop"``: write with direct I/O (large aligned blocks, no page cache). The save is as fast
  as the disk allows and evicts nothing else from memory, but the next load reads the disk.
- ``"auto"`` (the default): ``"keep"`` while keeping is cheap, measured on the file's own
  writes: once the page cache takes them slower than direct I/O would (below 1 GB/s; on the
  virtual machines measured here it ran at 0.1-0.4 GB/s, turning a 1 s save of 1 GiB into
  3-11 s) the rest of the file is written ``"drop"``. A file larger than half the memory the
  system reports available is written ``"drop"`` from the start: it would evict everything else
  and could not stay cached anyway. Checkpoint managers also drop the older step's pages from
  the cache when a new step is committed, so only the newest step (the one a restore reads)
  stays cached.

Loads read the cached part of a file from the cache and the rest direct or buffered, whichever
the load measured faster on its own first reads (:mod:`torchkeep.storage.coldread`): with direct
reads a dropped file loads without filling the cache, with buffered ones it ends cached.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from ..errors import CachePolicyError
from .stream import WriteMode

CachePolicy = Literal["keep", "drop", "auto"]
CACHE_POLICIES: tuple[CachePolicy, ...] = ("keep", "drop", "auto")
_MEMINFO = Path("/proc/meminfo")


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


def write_mode(cache: CachePolicy, nbytes: int) -> WriteMode:
    """How a file of ``nbytes`` saved under ``cache`` is written (:mod:`.stream`)."""
    if cache != "auto":
        return "cached" if cache == "keep" else "direct"
    available = available_memory()
    fits = available is None or nbytes <= available // 2
    return "cached-while-fast" if fits else "direct"


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
