"""Hash a shard file once while it is written: one digest per segment, one for the file.

A shard file is cut at every tensor boundary: ``[0, data start)`` holds the safetensors header,
then each tensor's bytes form a segment. :class:`SegmentHasher` sees the bytes in file order as
they are streamed (in whatever pieces the writer hands over) and keeps a digest per segment; the
chunk records in ``state.json`` carry them, so a rank that reads one chunk verifies exactly the
bytes it reads. The file's own hash is the XXH3-128 of the concatenated segment digests: it
covers every byte, and :func:`segmented_file_hash` recomputes it from the file alone (the cut
points come from the file's header).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from pathlib import Path

import xxhash

from ...formats import safetensors as st
from ...hashing import new_hasher

EMPTY_DIGEST = xxhash.xxh3_128_hexdigest(b"")


def cut_points(size: int, points: Iterable[int]) -> list[int]:
    """The sorted distinct segment boundaries of a ``size``-byte file, 0 and ``size`` included."""
    return sorted({0, size, *(p for p in points if 0 < p < size)})


def combine(digests: Iterable[str]) -> str:
    """The file hash of a segmented file: XXH3-128 over its segment digests in order."""
    return xxhash.xxh3_128_hexdigest(b"".join(bytes.fromhex(d) for d in digests))


class SegmentHasher:
    """A :class:`~torchkeep.hashing.Hasher` that digests each segment between ``points``.

    Args:
        points: the output of :func:`cut_points` for the file being written.
    """

    def __init__(self, points: list[int]) -> None:
        self._points = points
        self._index = 1
        self._position = 0
        self._current = new_hasher()
        self.digests: dict[int, str] = {}  # segment start -> digest

    def update(self, data: bytes | memoryview, /) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            end = self._points[self._index]
            n = min(len(view), end - self._position)
            self._current.update(view[:n])
            self._position += n
            view = view[n:]
            if self._position == end:
                self.digests[self._points[self._index - 1]] = self._current.hexdigest()
                self._index += 1
                self._current = new_hasher()

    def chunk_digest(self, begin: int, end: int) -> str:
        """The digest of the bytes ``[begin, end)``, which must be one segment (or empty)."""
        return EMPTY_DIGEST if begin == end else self.digests[begin]

    def hexdigest(self) -> str:
        return combine(self.digests[p] for p in self._points[:-1])


def segmented_file_hash(path: Path) -> str:
    """The segmented hash of the safetensors file at ``path``, cut where its header says.

    Raises:
        CorruptFileError: the file is not a valid safetensors file.
        OSError: it cannot be read.
    """
    header = st.read_header(path)
    points = cut_points(
        header.file_size,
        [header.data_start, *(p for e in header.entries.values() for p in (e.begin, e.end))],
    )
    hasher = SegmentHasher(points)
    if header.file_size:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                hasher.update(view[: header.file_size])
            finally:
                view.release()
    return hasher.hexdigest()
