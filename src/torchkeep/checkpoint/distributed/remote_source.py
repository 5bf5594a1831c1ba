"""Shards of a sharded step on object storage, read by ranges for :mod:`.staging`.

A restoring rank reads only the byte ranges of the chunks it needs: each span of adjacent
chunks is fetched in pieces of ``part_size * max_concurrency`` bytes, each piece as ranged
reads of ``part_size`` in flight at once, straight into the rank's private staging buffer,
where :mod:`.staging` hashes every chunk before any byte reaches a live tensor. Every read is
bounded by the deadline of the rank's restore of the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...errors import ChecksumMismatchError
from ...storage.reading import FileEndedError
from ...storage.store import ObjectStore
from ..remote import RemoteSteps
from .staging import Opener, ShardSource


class ObjectShard:
    """One shard object of a committed step, checked for its recorded size when opened.

    Raises:
        ChecksumMismatchError: the object is missing or has another size than the manifest's.
    """

    align = 1  # ranged reads fetch exactly the span: no page widening

    def __init__(self, store: ObjectStore, key: str, expected_size: int) -> None:
        self.store = store
        self.key = key
        self.path = store.url(key)
        transfer = store.transfer
        self.part = transfer.part_size
        self.piece = transfer.part_size * transfer.max_concurrency
        self._pool = ThreadPoolExecutor(transfer.max_concurrency, "torchkeep-shard-read")
        with store.deadline() as limit:  # the restore's, when one is running
            self._limit = limit
        try:
            size = store.size(key)
        except FileNotFoundError:
            self.close()
            raise ChecksumMismatchError(f"{self.path} is missing; the step is damaged") from None
        if size != expected_size:
            self.close()
            raise ChecksumMismatchError(
                f"{self.path} has {size} bytes, the manifest says {expected_size} (truncated or "
                "replaced); the step is damaged"
            )

    def read(self, view: memoryview, offset: int, needed: int) -> int:
        """Fetch bytes ``[offset, offset + needed)`` into ``view``, ``part_size`` per ranged
        read, concurrently."""

        def fetch(at: int) -> None:
            end = min(at + self.part, needed)
            try:
                with self.store.deadline(joining=self._limit):
                    data = self.store.read(self.key, start=offset + at, end=offset + end)
            except FileNotFoundError:
                raise FileEndedError(offset + at) from None
            if len(data) != end - at:
                raise FileEndedError(offset + at + len(data))
            view[at:end] = data

        for done in [self._pool.submit(fetch, at) for at in range(0, needed, self.part)]:
            done.result()
        return needed

    def cached(self, offset: int, nbytes: int) -> bool:
        """Never: an object is read, not mapped."""
        return False

    def mapped(self, low: int, high: int) -> None:
        """Never mapped (see :meth:`cached`)."""
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def shard_opener(remote: RemoteSteps, step: int, manifest: Mapping[str, Any]) -> Opener:
    """Open the shards of the committed ``step`` (``manifest``: its manifest) by name."""

    def open_shard(name: str, size: int) -> ShardSource:
        return ObjectShard(remote.store, remote.data_key(step, manifest, name), size)

    return open_shard
