"""Pausing Python's cyclic garbage collector around work that builds many small objects."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a block or function (usable as a decorator).

    A file of 20,000 tensors means about a million short-lived objects (header entries, views,
    offsets); every collection they trigger walks all live objects and finds no cycles. Pausing
    it cut the CPU time of reading such a header from 144 to 60 ms here. Reference counting
    still frees everything as usual; the collector is switched back on only if it was on.

    Example:
        >>> with gc_paused():
        ...     header = read_header(path)
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
