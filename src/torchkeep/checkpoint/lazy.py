"""Steps whose files arrive only when a reader is about to use them.

A checkpoint folder on object storage is copied into a private local folder as its committed
steps' manifests only; the readers that walk a folder's steps (loading, describing, verifying,
listing) call :func:`need` on a step just before they read its files, and the copy then fetches
that step (and drops the step fetched before it: one step's files on disk at a time). So
loading fetches the newest step and, only when the local checks find it damaged, the one
before it, exactly as the local reader falls back. On a local folder :func:`need` does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

Fetch = Callable[[Path], None]
_FETCH: ContextVar[Fetch | None] = ContextVar("torchkeep_step_fetch", default=None)


def need(step: Path) -> None:
    """Make sure the files of the step folder ``step`` are on disk before they are read
    (nothing to do for a local folder)."""
    fetch = _FETCH.get()
    if fetch is not None:
        fetch(step)


@contextlib.contextmanager
def fetching(fetch: Fetch) -> Iterator[None]:
    """Within the block, :func:`need` calls ``fetch`` (a lazily fetched remote folder)."""
    token = _FETCH.set(fetch)
    try:
        yield
    finally:
        _FETCH.reset(token)
