"""Move one object to or from an object store: streamed multipart uploads, ranged reads.

Uploads take the same spans as the local streaming writer (:mod:`torchkeep.storage.stream`):
the bytes are copied into parts of ``Transfer.part_size``, hashed on the way, and on S3 sent as
a multipart upload with up to ``Transfer.max_concurrency`` parts in flight, so one upload holds
at most ``part_size * max_concurrency`` bytes of parts (plus the one being filled). The object
appears only when the upload is completed; a failed upload is aborted. An object that fits in
one part is sent with one PUT. Other back ends get the object in one ``pipe_file`` call.

Downloads fetch ranges of ``part_size`` concurrently straight into a local file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from ..hashing import new_hasher
from ..manifest import FileRecord
from .remote import class_name
from .stream import Span
from .transfer import Deadline, Transfer, attempt

T = TypeVar("T")
MULTIPART = frozenset({"s3fs.core.S3FileSystem"})  # back ends uploaded part by part here


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
) -> FileRecord:
    """Write the bytes of ``spans`` as the object ``path`` (``url`` names it in errors).

    Returns:
        The object's size and content hash (of the bytes sent).

    Raises:
        RemoteStorageError: a call failed for good or the deadline passed; a started multipart
            upload is aborted.
    """
    target = _Target(fs, path, url, transfer, deadline)
    hasher = new_hasher()
    size = 0

    def hashed() -> Iterable[bytes]:
        nonlocal size
        for part in _parts(spans, transfer.part_size):
            hasher.update(part)
            size += len(part)
            yield part

    parts = iter(hashed())
    first = next(parts, b"")
    second = next(parts, None) if class_name(fs) in MULTIPART else None
    if second is None:  # one part, or a back end without multipart: one PUT
        data = first if class_name(fs) in MULTIPART else b"".join([first, *parts])
        target.call("upload", lambda: fs.pipe_file(path, data))
    else:
        _multipart(target, [first, second], parts)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    return FileRecord(size, hasher.hexdigest())


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


def download(
    fs: Any,
    path: str,
    url: str,
    destination: str | os.PathLike[str],
    size: int,
    *,
    transfer: Transfer,
    deadline: Deadline,
) -> None:
    """Copy the object ``path`` (expected to hold ``size`` bytes) into a new local file.

    Ranges of ``part_size`` are fetched concurrently (up to ``max_concurrency``). The caller
    hashes the file before using it: this only moves bytes.

    Raises:
        RemoteStorageError: a read failed for good or the deadline passed.
        FileNotFoundError: the object is gone.
    """
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def fetch(start: int) -> None:
        # The last range asks for one byte more: an object longer than the manifest says
        # leaves a longer file, which the caller's size check refuses.
        end = min(start + transfer.part_size, size + 1)
        data = attempt(
            lambda: fs.cat_file(path, start=start, end=end),
            url=url,
            operation=f"read of bytes {start}-{end}",
            transfer=transfer,
            deadline=deadline,
            final=(FileNotFoundError,),
        )
        os.pwrite(fd, data, start)

    try:
        starts = range(0, max(size, 1), transfer.part_size)
        if len(starts) == 1:
            fetch(0)
            return
        with ThreadPoolExecutor(min(transfer.max_concurrency, len(starts))) as pool:
            for future in [pool.submit(fetch, start) for start in starts]:
                future.result()
    finally:
        os.close(fd)
