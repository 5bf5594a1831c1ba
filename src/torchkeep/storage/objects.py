"""Move one object to or from an object store: streamed multipart uploads, ranged reads.

Uploads take the same spans as the local streaming writer (:mod:`torchkeep.storage.stream`):
the bytes are copied into parts of ``Transfer.part_size``, hashed on the way, and on S3 sent as
a multipart upload with up to ``Transfer.max_concurrency`` parts in flight, so one upload holds
at most ``part_size * max_concurrency`` bytes of parts (plus the one being filled). The object
appears only when the upload is completed; a failed upload is aborted. An object that fits in
one part is sent with one PUT. On GCS an object larger than one part is streamed as one
resumable upload (gcsfs's writer, fed part by part: it sends each part as soon as it has it and
retries each chunk itself), so it holds one part at a time. Other back ends get the object in
one ``pipe_file`` call.

Downloads fetch the ranges of ``part_size`` of one or many objects through one pool of
``Transfer.max_concurrency`` threads, straight into local files.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..hashing import Hasher, new_hasher
from ..manifest import FileRecord
from .gcs import GCS_FILESYSTEMS
from .remote import class_name
from .stream import Span
from .transfer import Deadline, Transfer, attempt

T = TypeVar("T")
MULTIPART = frozenset({"s3fs.core.S3FileSystem"})  # back ends uploaded part by part here
RESUMABLE = frozenset(GCS_FILESYSTEMS)  # back ends streamed through their own writer


class _Target:
    """One object being written: where, and how each call to it is bounded."""

    def __init__(
        self, fs: Any, path: str, url: str, transfer: Transfer, deadline: Deadline
    ) -> None:
        self.fs, self.path, self.url = fs, path, url
        self.transfer, self.deadline = transfer, deadline

    def call(self, operation: str, call: Callable[[], T]) -> T:
        return attempt(
            call, url=self.url, operation=operation, transfer=self.transfer, deadline=self.deadline
        )


def _parts(spans: Iterable[Span], part_size: int) -> Iterable[bytes]:
    """The bytes of ``spans`` cut into parts of ``part_size`` (the last one shorter)."""
    buffer = bytearray(part_size)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    fill = 0
    for start, size in spans:
        position = 0
        while position < size:
            n = min(size - position, part_size - fill)
            ctypes.memmove(address + fill, start + position, n)
            fill, position = fill + n, position + n
            if fill == part_size:
                yield bytes(buffer)
                fill = 0
    if fill:
        yield bytes(buffer[:fill])


def upload(
    fs: Any,
    path: str,
    url: str,
    spans: Iterable[Span],
    *,
    transfer: Transfer,
    deadline: Deadline,
    hasher: Hasher | None = None,
) -> FileRecord:
    """Write the bytes of ``spans`` as the object ``path`` (``url`` names it in errors).

    ``hasher`` is fed every byte in order (a sharded step's segment hasher); by default the
    XXH3-128 of the object.

    Returns:
        The object's size and content hash (of the bytes sent).

    Raises:
        RemoteStorageError: a call failed for good or the deadline passed; a started multipart
            upload is aborted.
    """
    target = _Target(fs, path, url, transfer, deadline)
    hasher = new_hasher() if hasher is None else hasher
    size = 0

    def hashed() -> Iterable[bytes]:
        nonlocal size
        for part in _parts(spans, transfer.part_size):
            hasher.update(part)
            size += len(part)
            yield part

    parts = iter(hashed())
    kind = class_name(fs)
    first = next(parts, b"")
    second = next(parts, None) if kind in MULTIPART | RESUMABLE else None
    if second is None:  # one part, or a back end without either: one PUT
        data = first if kind in MULTIPART | RESUMABLE else b"".join([first, *parts])
        target.call("upload", lambda: fs.pipe_file(path, data))
    elif kind in RESUMABLE:
        _resumable(target, [first, second], parts)
    else:
        _multipart(target, [first, second], parts)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    return FileRecord(size, hasher.hexdigest())


def _resumable(target: _Target, head: list[bytes], rest: Iterable[bytes]) -> None:
    """One resumable upload of ``head`` then ``rest``, part by part, through the back end's
    own writer (which retries each chunk). The parts are made on this thread (a span's memory
    is read only while the caller waits) and each call is bounded by the deadline; nothing is
    attempted twice, since the parts are consumed as they are sent. A failed upload is never
    completed, so it leaves no object (a closed writer would complete it with what it has)."""
    once = dataclasses.replace(target.transfer, retries=0)

    def bounded(operation: str, call: Callable[[], Any]) -> Any:
        return attempt(
            call, url=target.url, operation=operation, transfer=once, deadline=target.deadline
        )

    part_size = target.transfer.part_size
    f = bounded("start of upload", lambda: target.fs.open(target.path, "wb", block_size=part_size))
    try:
        for part in _chain(head, rest):
            bounded("upload", functools.partial(f.write, part))
        bounded("completion of upload", f.close)
    except BaseException:
        f.closed = True  # never completed, not even when the writer is collected
        raise


def _multipart(target: _Target, head: list[bytes], rest: Iterable[bytes]) -> None:
    """An S3 multipart upload of ``head`` then ``rest``, parts in parallel; aborted on failure."""
    fs, transfer = target.fs, target.transfer
    bucket, key, _ = fs.split_path(target.path)
    started = target.call(
        "start of multipart upload",
        lambda: fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key),
    )
    upload_id = started["UploadId"]
    slots = threading.BoundedSemaphore(transfer.max_concurrency)
    futures: list[Future[Any]] = []

    def send(number: int, data: bytes) -> Any:
        try:
            return target.call(
                f"upload of part {number}",
                lambda: fs.call_s3(
                    "upload_part",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                ),
            )
        finally:
            slots.release()

    try:
        with ThreadPoolExecutor(transfer.max_concurrency, "torchkeep-upload") as pool:
            numbered = enumerate(_chain(head, rest), start=1)
            while True:
                # A slot first, then the next part's bytes: at most max_concurrency parts held
                while not slots.acquire(timeout=1.0):
                    _raise_first_failure(futures)
                item = next(numbered, None)
                if item is None:
                    slots.release()
                    break
                futures.append(pool.submit(send, *item))
                _raise_first_failure(futures)
            done = [future.result() for future in futures]
        parts = [{"PartNumber": n, "ETag": out["ETag"]} for n, out in enumerate(done, start=1)]
        target.call(
            "completion of multipart upload",
            lambda: fs.call_s3(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            ),
        )
    except BaseException:
        for future in futures:
            future.cancel()
        abort_multipart(fs, bucket, key, upload_id)
        raise


def _chain(head: list[bytes], rest: Iterable[bytes]) -> Iterable[bytes]:
    yield from head
    yield from rest


def _raise_first_failure(futures: list[Future[Any]]) -> None:
    for future in futures:
        if future.done() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]


def abort_multipart(fs: Any, bucket: str, key: str, upload_id: str) -> None:
    """Abort an incomplete multipart upload, best effort (a lifecycle rule is the backstop)."""
    with contextlib.suppress(Exception):
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)


@dataclass(frozen=True)
class Fetch:
    """One object to copy into a new local file.

    Attributes:
        path: the object's path on the filesystem.
        url: its URL, for messages.
        destination: the local file to create (it must not exist).
        limit: read at most this many bytes plus one (a size a manifest records: an object
            longer than it leaves a longer file, which the caller's size check refuses, and a
            hostile manifest cannot make it read more); None reads the whole object.
    """

    path: str
    url: str
    destination: Path
    limit: int | None = None


def download_many(
    fs: Any, fetches: Sequence[Fetch], *, transfer: Transfer, deadline: Deadline
) -> set[Path]:
    """Copy the objects of ``fetches`` into new local files, concurrently.

    Every object's size is looked up, then the ranges of ``part_size`` of every object are
    read, all through one pool: at most ``max_concurrency`` requests are in flight in total,
    whichever files they belong to, and every one is bounded by ``deadline``. The caller
    hashes the files before using them: this only moves bytes.

    Returns:
        The destinations of objects that do not exist (no local file is left for them).

    Raises:
        RemoteStorageError: a read failed for good or the deadline passed (the reads not yet
            started are cancelled).
    """

    def call(fetch: Fetch, operation: str, run: Callable[[], T]) -> T:
        return attempt(
            run,
            url=fetch.url,
            operation=operation,
            transfer=transfer,
            deadline=deadline,
            final=(FileNotFoundError,),
        )

    def size(fetch: Fetch) -> int | None:
        with contextlib.suppress(Exception):
            fs.invalidate_cache(fetch.path)
        try:
            info = call(fetch, "size lookup", lambda: fs.info(fetch.path))
        except FileNotFoundError:
            return None
        if info.get("type", "file") != "file":
            return None
        found = int(info["size"])  # what to read: the object, to one byte past the limit
        return found if fetch.limit is None else min(found, fetch.limit + 1)

    step = transfer.part_size
    missing: set[Path] = set()
    with ThreadPoolExecutor(transfer.max_concurrency, "torchkeep-download") as pool:
        sizes = list(pool.map(size, fetches))
        files: dict[Fetch, tuple[int, int]] = {}
        try:
            for fetch, found in zip(fetches, sizes, strict=True):
                if found is None:
                    missing.add(fetch.destination)
                else:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                    files[fetch] = (os.open(fetch.destination, flags, 0o600), found)
            ranges = [
                pool.submit(_read_range, fs, fetch, fd, start, min(start + step, wanted), call)
                for fetch, (fd, wanted) in files.items()
                for start in range(0, wanted, step)
            ]
            try:
                missing.update(gone for gone in (f.result() for f in ranges) if gone is not None)
            except BaseException:
                for future in ranges:
                    future.cancel()
                wait(ranges)  # no read may still write to a descriptor closed below
                raise
        finally:
            for fd, _ in files.values():
                os.close(fd)
    for destination in missing:  # absent, or deleted between the size lookup and the read
        destination.unlink(missing_ok=True)
    return missing


def _read_range(
    fs: Any,
    fetch: Fetch,
    fd: int,
    start: int,
    end: int,
    call: Callable[[Fetch, str, Callable[[], bytes]], bytes],
) -> Path | None:
    """Copy bytes ``[start, end)`` of the object into ``fd``; return the destination when the
    object is gone."""
    try:
        data = call(
            fetch,
            f"read of bytes {start}-{end}",
            lambda: fs.cat_file(fetch.path, start=start, end=end),
        )
    except FileNotFoundError:
        return fetch.destination
    os.pwrite(fd, data, start)
    return None
