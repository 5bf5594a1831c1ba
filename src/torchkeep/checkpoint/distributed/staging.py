"""Where a restoring rank holds the chunks it reads until every rank has verified them.

A restore must not copy a byte into a live tensor before every rank has hashed all it needs
(one damaged chunk anywhere makes every rank refuse the step), so each rank first stages all of
its chunks and hashes them; ``read_data`` copies from there. This module makes that first pass
cheap:

- **cached spans are mapped**: a span whose pages are all in the page cache (a step read or
  saved moments ago; a span only partly cached is cut where its chunks change between cached
  and not, see :func:`_by_residency`) is mapped privately (``MAP_PRIVATE``, copy-on-write,
  faulted in as it is hashed) instead of read, then hashed and later copied from the mapping:
  one copy instead of two, and no fresh memory to fault in (the dearest part of a cached read
  on the machines measured: 256 MiB staged and copied in 296 ms read, 111 ms mapped, one
  process). ``MAP_POPULATE`` is not used: on a writable private mapping it copies every
  page, which is the read again. The trade: a mapping of a file shows writes made to that
  file after the hash (see :data:`MAP_CACHED`);
- **spans**: the chunks of one file that lie next to each other (a rank's own shard is one
  span) are staged together; a span not wholly cached is read in pieces of :data:`PIECE`
  bytes into one fresh page-aligned buffer of anonymous private memory (4 KiB pages:
  transparent huge pages measured 3-5x slower here in a fresh process, whose huge pages must
  all be backed anew);
- **uncached pieces, direct or buffered by measurement**: a piece that is not in the page
  cache (a step just written with direct I/O, or read after a reboot) is read the way one
  :class:`~torchkeep.storage.coldread.ReadChooser` per restore picks, by timing the restore's
  first uncached pieces both ways: with ``O_DIRECT`` straight into the buffer (whose spans are
  laid out with the file's page alignment, so no bounce copy is made; the page cache is left
  as it was), or buffered (the kernel reads ahead while the rank hashes; the step's files then
  stay in the page cache). A cached piece is read with plain ``preadv`` (one kernel copy);
- **hashed while hot**: each chunk's XXH3-128 is fed with every piece right after that piece
  lands, while it is in the CPU cache, and compared when the chunk's last byte has arrived.

For a span that was read, the bytes hashed are the bytes later copied (the buffer is private to
this process), so a file changed on disk during the restore cannot slip unverified bytes in.
For a mapped span, someone who can write to the step's files while the restore runs can: bytes
written between the hash and the copy reach the live tensors unverified, and a file truncated
then makes the rank die of ``SIGBUS``. Without write access to the files nothing changes.

Where the bytes come from is a :class:`ShardSource`: a local file by default (the above), or a
shard object on object storage read by ranges (:mod:`.remote_source`, never mapped); spans,
hashing and buffers are the same for both.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import xxhash

from ...errors import ChecksumMismatchError
from ...formats import safetensors as st
from ...storage.coldread import ReadChooser
from ...storage.reading import FileEndedError, RangeReader

PIECE = 4 << 20
"""Bytes per read: large enough for the disk, small enough to be hashed from the CPU cache."""
MERGE_GAP = 256 << 10
"""Chunks of one file at most this far apart are read as one span (the gap is read, unused)."""
MAP_CACHED = True
"""Map spans wholly in the page cache instead of reading them (see the module docstring: a
writer to the step's files during the restore can then change bytes after their hash)."""
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class ChunkRef:
    """One stored chunk a rank needs: where its bytes lie and what they must hash to."""

    file: str
    offset: int
    length: int
    digest: str
    label: str
    """The tensor it belongs to, for messages."""


@dataclass
class _Span:
    """Adjacent chunks of one file, read as one range into a buffer of their own."""

    file: str
    start: int
    end: int
    chunks: list[ChunkRef] = field(default_factory=list)

    def bounds(self, align: int) -> tuple[int, int]:
        """The span widened to whole blocks of ``align`` bytes (pages: what direct I/O
        reads; 1: exactly the span, what a ranged read of an object fetches)."""
        return self.start - self.start % align, -(-self.end // align) * align


def where(chunk: ChunkRef) -> tuple[str, int, int]:
    """The key of ``chunk``'s bytes in what :func:`stage` returns."""
    return chunk.file, chunk.offset, chunk.length


def _spans(chunks: Iterable[ChunkRef]) -> list[_Span]:
    """The chunks grouped into spans: per file, by offset, neighbours merged."""
    spans: list[_Span] = []
    for chunk in sorted(set(chunks), key=lambda c: (c.file, c.offset, c.length)):
        last = spans[-1] if spans else None
        if last is not None and last.file == chunk.file and chunk.offset <= last.end + MERGE_GAP:
            last.end = max(last.end, chunk.offset + chunk.length)
            last.chunks.append(chunk)
        else:
            spans.append(_Span(chunk.file, chunk.offset, chunk.offset + chunk.length, [chunk]))
    return spans


def allocate(nbytes: int) -> torch.Tensor:
    """A fresh page-aligned ``uint8`` tensor of ``nbytes`` (what direct I/O reads into);
    ``torch.empty`` where anonymous maps are missing (direct I/O is off there)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    if nbytes == 0 or os.name != "posix" or not flags:
        return torch.empty(nbytes, dtype=torch.uint8)
    memory = mmap.mmap(-1, nbytes, flags=flags)
    return torch.frombuffer(memory, dtype=torch.uint8)  # keeps ``memory`` alive


def _by_residency(span: _Span, cached: Callable[[int, int], bool]) -> list[_Span]:
    """``span`` cut where its chunks change from wholly in the page cache to not (a step
    saved under ``cache="auto"`` is cached at the start of each file only), so that the
    cached parts can be mapped and the rest read. Empty chunks join the part before them."""
    parts: list[tuple[bool, _Span]] = []
    for chunk in span.chunks:  # by offset
        end = chunk.offset + chunk.length
        state = parts[-1][0] if parts and not chunk.length else cached(chunk.offset, chunk.length)
        if parts and parts[-1][0] == state:
            part = parts[-1][1]
            part.end = max(part.end, end)
            part.chunks.append(chunk)
        else:
            parts.append((state, _Span(span.file, chunk.offset, end, [chunk])))
    return [part for _state, part in parts]


class ShardSource(Protocol):
    """One shard opened for staging (a local file, or an object read by ranges)."""

    @property
    def path(self) -> object:
        """What names it in messages."""
        ...

    @property
    def align(self) -> int:
        """Spans are widened to whole blocks of this many bytes."""
        ...

    @property
    def piece(self) -> int:
        """Bytes asked of :meth:`read` at once."""
        ...

    def read(self, view: memoryview, offset: int, needed: int) -> int:
        """Fill ``view`` from ``offset`` (at least its first ``needed`` bytes); return the
        bytes read. Raise :class:`FileEndedError` when the shard ends before ``needed``."""
        ...

    def cached(self, offset: int, nbytes: int) -> bool:
        """Whether those bytes are all in the page cache (then :meth:`mapped` may map them)."""
        ...

    def mapped(self, low: int, high: int) -> torch.Tensor | None:
        """Bytes ``low`` to ``high`` as a private mapping when they are all cached, else None
        (then they are read)."""
        ...

    def close(self) -> None:
        """Release what reading held."""
        ...


Opener = Callable[[str, int], ShardSource]
"""Opens shard file ``name`` whose manifest size is ``size`` (ChecksumMismatchError when it is
missing or has another size)."""


class _ShardFile:
    """One shard file opened for staging: plain reads for cached bytes; for the others, direct
    or buffered reads as ``chooser`` picks (:class:`~torchkeep.storage.reading.RangeReader`)."""

    align = _PAGE

    @property
    def piece(self) -> int:
        return PIECE  # read at each call: tests shrink it

    def __init__(self, path: Path, expected_size: int, chooser: ReadChooser) -> None:
        self.path = path
        try:
            self.reader = RangeReader(path, chooser=chooser)
        except FileNotFoundError:
            raise ChecksumMismatchError(f"{path} is missing; the step is damaged") from None
        self.size = size = os.path.getsize(path)
        if size != expected_size:
            self.reader.close()
            raise ChecksumMismatchError(
                f"{path} has {size} bytes, the manifest says {expected_size} (truncated or "
                "replaced); the step is damaged"
            )

    def read(self, view: memoryview, offset: int, needed: int) -> int:
        """Fill the first ``needed`` bytes of ``view`` from ``offset`` (the rest of it may lie
        past the end of the file); return the bytes read."""
        self.reader.read([view[:needed]], offset)
        return needed

    def cached(self, offset: int, nbytes: int) -> bool:
        return bool(self.reader.cached(offset, nbytes))

    def mapped(self, low: int, high: int) -> torch.Tensor | None:
        """The file's bytes from the page-aligned ``low`` to ``high`` (or its end) as a private
        mapping when they are all in the page cache, else None (read them instead)."""
        end = min(high, self.size)
        if not MAP_CACHED or os.name != "posix" or end <= low:
            return None
        if not self.reader.cached(low, end - low):
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < end:  # shrunk since the size check: the read reports it
                return None
            memory = mmap.mmap(fd, end - low, flags=mmap.MAP_PRIVATE, offset=low)
        finally:
            os.close(fd)
        return torch.frombuffer(memory, dtype=torch.uint8)  # keeps ``memory`` alive

    def close(self) -> None:
        self.reader.close()


def stage(
    directory: Path,
    chunks: Iterable[ChunkRef],
    sizes: Mapping[str, int],
    *,
    verify: bool = True,
    opener: Opener | None = None,
) -> dict[tuple[str, int, int], torch.Tensor]:
    """Read every chunk of ``chunks`` into fresh memory, each hashed as its bytes arrive.

    Args:
        directory: the step directory the chunks' files lie in.
        chunks: the chunks this rank needs (duplicates are read once).
        sizes: each file's size as the manifest records it (checked before reading).
        verify: compare each chunk's XXH3-128 with its record (off: read only).
        opener: opens a shard by name (default: the file of that name in ``directory``;
            on object storage the object, read by ranges).

    Returns:
        ``{(file, offset, length): bytes}``: each chunk as a ``uint8`` tensor (a view of
        its span's buffer).

    Raises:
        ChecksumMismatchError: a file is missing, has another size, ends early, or a chunk's
            bytes do not match their hash (naming the file and the tensor).
    """
    staged: dict[tuple[str, int, int], torch.Tensor] = {}
    files: dict[str, ShardSource] = {}
    if opener is None:
        chooser = ReadChooser()  # one measurement for the whole restore, all files

        def opener(name: str, size: int) -> ShardSource:
            return _ShardFile(directory / name, size, chooser)

    try:
        for whole in _spans(chunks):
            if whole.file not in files:
                files[whole.file] = opener(whole.file, sizes[whole.file])
            handle = files[whole.file]
            for span in _by_residency(whole, handle.cached) if MAP_CACHED else [whole]:
                low, high = span.bounds(handle.align)
                buffer = handle.mapped(low, high)
                if buffer is not None:
                    if verify:
                        _check_mapped(handle.path, span, st.tensor_bytes(buffer), low)
                else:
                    buffer = allocate(high - low)
                    _read_span(handle, span, st.tensor_bytes(buffer), verify=verify)
                for chunk in span.chunks:
                    begin = chunk.offset - low
                    staged[where(chunk)] = buffer[begin : begin + chunk.length]
    finally:
        for handle in files.values():
            handle.close()
    return staged


def _read_span(handle: ShardSource, span: _Span, memory: memoryview, *, verify: bool) -> None:
    """Read ``span`` into ``memory`` piece by piece, feeding each chunk's hash as bytes land."""
    low, high = span.bounds(handle.align)
    pending = sorted(span.chunks, key=lambda c: c.offset)
    hashers = {chunk: xxhash.xxh3_128() for chunk in pending}
    fed = {chunk: chunk.offset for chunk in pending}
    position = low
    while pending:
        size = min(handle.piece, high - position)
        at = position - low
        try:
            got = handle.read(memory[at : at + size], position, min(size, span.end - position))
        except FileEndedError:
            raise ChecksumMismatchError(
                f"{handle.path} ended early (truncated while being read); the step is damaged"
            ) from None
        position += got
        while pending and pending[0].offset + pending[0].length <= position:
            done = pending.pop(0)
            _feed(hashers[done], memory, low, done, fed[done], done.offset + done.length)
            if verify:
                _check(handle.path, done, hashers[done])
        for chunk in pending:
            if chunk.offset >= position:
                break
            fed[chunk] = _feed(hashers[chunk], memory, low, chunk, fed[chunk], position)


def _feed(
    hasher: xxhash.xxh3_128, memory: memoryview, low: int, chunk: ChunkRef, start: int, end: int
) -> int:
    """Hash ``chunk``'s bytes from file offset ``start`` to ``end`` (its part that has
    arrived; ``memory`` starts at file offset ``low``); return where its hash now stands."""
    end = min(end, chunk.offset + chunk.length)
    if end > start:
        hasher.update(memory[start - low : end - low])
    return max(start, end)


def _check_mapped(path: object, span: _Span, memory: memoryview, low: int) -> None:
    """Hash every chunk of the mapped ``span`` (``memory`` starts at file offset ``low``)."""
    for chunk in span.chunks:
        begin = chunk.offset - low
        _check(path, chunk, xxhash.xxh3_128(memory[begin : begin + chunk.length]))


def _check(path: object, chunk: ChunkRef, hasher: xxhash.xxh3_128) -> None:
    """Raise unless ``hasher``, fed with all of ``chunk``'s bytes, matches its record."""
    if hasher.hexdigest() != chunk.digest:
        raise ChecksumMismatchError(
            f"{path}: the bytes of {chunk.label!r} do not match their xxh3_128 hash "
            "(corrupted); the step is damaged"
        )
