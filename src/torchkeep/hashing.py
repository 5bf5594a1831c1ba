"""Content hashes for manifests.

The hash is XXH3-128: it detects corruption (flipped bits, truncation, stale files) at ~13 GB/s on
one core here, so hashing costs a few percent of a durable save. It is not a defence against
an attacker who can rewrite both a file and its manifest; nothing stored beside the data can be.
"""

from __future__ import annotations

import os
from typing import Protocol

import xxhash

HASH_ALGORITHM = "xxh3_128"
_READ_CHUNK = 8 << 20


class Hasher(Protocol):
    """The incremental hashing interface used by writers."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher() -> Hasher:
    """Return a fresh incremental hasher for :data:`HASH_ALGORITHM`."""
    hasher: Hasher = xxhash.xxh3_128()
    return hasher


def hash_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Return ``(size, hexdigest)`` of the file at ``path``, read in chunks."""
    hasher = new_hasher()
    size = 0
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            hasher.update(view[:n])
            size += n
    return size, hasher.hexdigest()
