"""How bytes that are not in the page cache are read: direct I/O or buffered, chosen by measurement.

A range of a file that is not in the page cache (it was dropped, or a save wrote it with direct
I/O) can be read two ways, and on the virtual machines measured here neither wins in every
state of the machine (the same holds for writes, :mod:`torchkeep.storage.stream`):

- ``"direct"``: ``O_DIRECT`` reads of large aligned blocks. They do not touch the page cache,
  so they **leave it as it was** (the file stays uncached, nothing else is evicted); when
  filling the page cache is slow (on this Firecracker VM every page new to the page cache
  costs a host fault, 0.2-0.5 GB/s at worst) they are several times faster.
- ``"buffered"``: plain reads through the page cache, which reads ahead while the caller
  copies and hashes (``POSIX_FADV_SEQUENTIAL`` widens the window). When the page cache is
  fast they are the faster way (1 GiB, idle machine: 0.57-0.76 s against 0.79-0.92 s direct),
  but **the bytes read stay in the page cache**: after the load the file is cached, as the
  peers (safetensors, ``torch.load``) leave theirs, and other cached pages may be evicted to
  make room.

A :class:`ReadChooser` decides for the reads it is shared by (one file, or one load of
several files): its first uncached reads are a trial, :data:`TRIAL_BYTES` in a row each way
(direct first, then buffered, so the buffered reads' read-ahead cannot have fetched what the
direct trial reads), timed as useful bytes per second; the faster way reads the rest. Every
:data:`RECHECK_EVERY` reads after that, the other way gets a new trial, so a machine whose state
changes during a long load is followed; each way's rate weighs its latest reads most
(:data:`DECAY`). Against both ways pinned (interleaved, caches dropped each time), the faster
pinned way changed between samples minutes apart, and the chooser's loads came out level with
it or ahead (figures: the closing note of the cold-read work). Which way is taken never
changes what is read: both are exact, and both raise
:class:`~torchkeep.storage.reading.FileEndedError` at a file's early end.

Pinned choices: hashing for ``verify`` (:mod:`torchkeep.hashing`) always reads direct (checking a
file must not fill the cache); tests pin every chooser through :data:`PINNED`. Where direct I/O
or ``mincore`` is missing (macOS, tmpfs) the reader reads plainly and asks no chooser.
"""

from __future__ import annotations

import threading
from typing import Literal

ReadMode = Literal["direct", "buffered"]
READ_MODES: tuple[ReadMode, ...] = ("direct", "buffered")

TRIAL_BYTES = 8 << 20
"""Bytes each way reads in a row before the rates are compared (two staging pieces: a buffered
trial of one piece pays its read-ahead's start and never shows what read-ahead gains)."""
RECHECK_EVERY = 16
"""After the trial, every this many reads the way that lost gets a new trial of
:data:`TRIAL_BYTES` in a row, to measure it again."""
DECAY = 0.5
"""Weight of a way's earlier reads each time it reads again (its rate follows the machine)."""
PINNED: ReadMode | None = None
"""Test hook: when set, every chooser that is not fixed reads uncached bytes this way."""


class ReadChooser:
    """Picks how the uncached reads it is shared by are made; safe to use from several threads.

    Args:
        fixed: always this way, measured or not (hashing pins ``"direct"``); None measures.

    Example:
        >>> chooser = ReadChooser()
        >>> mode = chooser.pick(8 << 20)  # "direct" first: the trial
        >>> chooser.record(mode, 8 << 20, seconds=0.01)
    """

    def __init__(self, *, fixed: ReadMode | None = None) -> None:
        self._fixed = fixed
        self._lock = threading.Lock()
        self._claimed = dict.fromkeys(READ_MODES, 0)  # bytes handed to each way in the trial
        self._bytes = dict.fromkeys(READ_MODES, 0.0)  # decayed useful bytes read each way
        self._seconds = dict.fromkeys(READ_MODES, 0.0)  # ... and the decayed seconds taken
        self._since_check = 0

    def pick(self, nbytes: int) -> ReadMode:
        """How to read the next ``nbytes`` uncached bytes (then :meth:`record` what it took)."""
        if self._fixed is not None:
            return self._fixed
        if PINNED is not None:
            return PINNED
        with self._lock:
            for mode in READ_MODES:  # the trial: direct first, then buffered
                if self._claimed[mode] < TRIAL_BYTES:
                    self._claimed[mode] += nbytes
                    return mode
            best = self._faster()
            self._since_check += 1
            if self._since_check >= RECHECK_EVERY:  # a new trial of the losing way
                self._since_check = 0
                other: ReadMode = "buffered" if best == "direct" else "direct"
                self._claimed[other] = nbytes
                return other
            return best

    def record(self, mode: ReadMode, nbytes: int, seconds: float) -> None:
        """Note that ``nbytes`` wanted bytes took ``seconds`` to read the ``mode`` way."""
        with self._lock:
            self._bytes[mode] = self._bytes[mode] * DECAY + nbytes
            self._seconds[mode] = self._seconds[mode] * DECAY + max(seconds, 0.0)

    def _faster(self) -> ReadMode:
        """The way with the higher measured rate (``"direct"`` until both have been timed)."""
        if not all(self._bytes.values()):
            return "direct"
        rates = {
            mode: self._bytes[mode] / self._seconds[mode] if self._seconds[mode] else float("inf")
            for mode in READ_MODES
        }
        return "buffered" if rates["buffered"] > rates["direct"] else "direct"
