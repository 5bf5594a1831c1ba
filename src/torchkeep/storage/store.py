"""The storage seam: a place that holds objects by key, on a local disk or in an object store.

A :class:`Store` is rooted at a directory or URL; keys are ``/``-separated paths below the root.
Call order of a commit (what the checkpoint and bundle writers do):

1. ``write``/``write_stream`` every data object under a prefix no reader looks at yet,
2. ``create_exclusive`` the commit marker (a manifest) last: it appears whole, only if absent,
3. on failure ``delete_prefix`` what was written; to retire, delete the marker first.

:func:`open_store` picks the implementation: a local path gets :class:`LocalStore` (atomic
files with fsync and rename, no fsspec on the way); a URL gets :class:`ObjectStore` over fsspec,
whose every call is retried and bounded by :class:`~torchkeep.storage.transfer.Transfer`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..hashing import Hasher, new_hasher
from ..manifest import FileRecord
from . import objects
from .local import atomic_file, temp_sibling
from .remote import (
    ExclusiveCreate,
    ReplaceIf,
    class_name,
    exclusive_create,
    filesystem,
    is_remote,
    object_version,
    replace_if,
)
from .stream import Span, write_stream
from .transfer import Deadline, Transfer, attempt


class Store(Protocol):
    """Objects by key under one root (see the module's documentation for the call order)."""

    def url(self, key: str = "") -> str:
        """The full location of ``key`` (for messages and for users)."""
        ...

    def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        """The bytes of ``key`` (``[start, end)`` when given); FileNotFoundError if absent."""
        ...

    def download(self, key: str, destination: Path, size: int) -> None:
        """Copy ``key`` (``size`` bytes expected) into the new local file ``destination``."""
        ...

    def write(self, key: str, data: bytes) -> FileRecord:
        """Create or replace ``key`` with ``data``, whole or not at all."""
        ...

    def write_stream(
        self, key: str, spans: Iterable[Span], *, hasher: Hasher | None = None
    ) -> FileRecord:
        """Create or replace ``key`` with the memory of ``spans``, hashed on the way (by
        ``hasher`` when given, else XXH3-128)."""
        ...

    def create_exclusive(self, key: str, data: bytes) -> None:
        """Create ``key`` only if it does not exist (atomically); else FileExistsError."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists now."""
        ...

    def size(self, key: str) -> int:
        """The size of ``key`` in bytes; FileNotFoundError if absent."""
        ...

    def keys(self, prefix: str = "", *, maxdepth: int | None = None) -> dict[str, float]:
        """Keys below ``prefix`` (relative to the root) and their modification times, fresh."""
        ...

    def delete(self, key: str) -> None:
        """Delete ``key`` (no error if absent)."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key below ``prefix`` (no error if none)."""
        ...


class LocalStore:
    """A :class:`Store` on a local directory: atomic files (temp + fsync + rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def url(self, key: str = "") -> str:
        return str(self._path(key))

    def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        with open(self._path(key), "rb") as f:
            f.seek(start or 0)
            return f.read(-1 if end is None else max(end - (start or 0), 0))

    def download(self, key: str, destination: Path, size: int) -> None:
        shutil.copyfile(self._path(key), destination)

    def write(self, key: str, data: bytes) -> FileRecord:
        hasher = new_hasher()
        hasher.update(data)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            f.write(data)
        return FileRecord(len(data), hasher.hexdigest())

    def write_stream(
        self, key: str, spans: Iterable[Span], *, hasher: Hasher | None = None
    ) -> FileRecord:
        hasher = new_hasher() if hasher is None else hasher
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            size = write_stream(f.fileno(), spans, hasher, mode="cached")
        return FileRecord(size, hasher.hexdigest())

    def create_exclusive(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = temp_sibling(path)
        with atomic_file(staged) as f:
            f.write(data)
        try:
            os.link(staged, path)  # fails with FileExistsError if taken: atomic
        finally:
            staged.unlink()

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def keys(self, prefix: str = "", *, maxdepth: int | None = None) -> dict[str, float]:
        base = self._path(prefix)
        found: dict[str, float] = {}
        if not base.is_dir():
            return found
        for path in base.rglob("*"):
            relative = path.relative_to(base)
            if path.is_file() and (maxdepth is None or len(relative.parts) <= maxdepth):
                found[path.relative_to(self.root).as_posix()] = path.stat().st_mtime
        return found

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)


class ObjectStore:
    """A :class:`Store` on an fsspec filesystem (s3://, gs://, memory://, ...).

    Every call is retried on transient failures and bounded by the deadline of the operation
    it belongs to (:meth:`deadline`, else ``transfer.deadline_s`` per call); final failures
    are :class:`~torchkeep.errors.RemoteStorageError`.

    Reading and plain writes work on any fsspec back end; :meth:`create_exclusive` (a commit)
    needs an adapter (:mod:`torchkeep.storage.remote`) or ``transfer.single_writer``.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        transfer: Transfer | None = None,
    ) -> None:
        self.transfer = transfer if transfer is not None else Transfer()
        self.fs, self.root = filesystem(url, storage_options)
        self._scheme = url.split("://", 1)[0]
        self._create: ExclusiveCreate | None = None
        self._replace: ReplaceIf | None = None
        self._local = threading.local()

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def url(self, key: str = "") -> str:
        return f"{self._scheme}://{self._path(key)}"

    @contextlib.contextmanager
    def deadline(
        self, seconds: float | None = None, *, joining: Deadline | None = None
    ) -> Iterator[Deadline]:
        """Bound every call made by this thread inside the block by one deadline (a save);
        ``joining``: the deadline another thread's operation runs under (a pool's reads)."""
        outer = getattr(self._local, "deadline", None)
        if outer is not None:  # nested: the outer deadline holds
            yield outer
            return
        if joining is None:
            joining = Deadline(self.transfer.deadline_s if seconds is None else seconds)
        self._local.deadline = joining
        try:
            yield self._local.deadline
        finally:
            self._local.deadline = None

    def _deadline(self) -> Deadline:
        current: Deadline | None = getattr(self._local, "deadline", None)
        return current if current is not None else Deadline(self.transfer.deadline_s)

    def _call(self, operation: str, key: str, call: Any, *, final: tuple[type, ...] = ()) -> Any:
        return attempt(
            call,
            url=self.url(key),
            operation=operation,
            transfer=self.transfer,
            deadline=self._deadline(),
            final=final,
        )

    def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        path = self._path(key)
        data: bytes = self._call(
            "read",
            key,
            lambda: self.fs.cat_file(path, start=start, end=end),
            final=(FileNotFoundError,),
        )
        return data

    def download(self, key: str, destination: Path, size: int) -> None:
        if self.download_many({key: (destination, size)}):
            raise FileNotFoundError(f"{self.url(key)} does not exist")

    def download_many(self, wanted: Mapping[str, tuple[Path, int | None]]) -> set[str]:
        """Copy objects into new local files concurrently (``key: (destination, limit)``;
        at most ``limit`` bytes plus one of each, None: all of it) with at most
        ``transfer.max_concurrency`` requests in flight in total, every one bounded by the
        current deadline; return the keys that do not exist."""
        fetches = [
            objects.Fetch(self._path(key), self.url(key), destination, limit)
            for key, (destination, limit) in wanted.items()
        ]
        gone = objects.download_many(
            self.fs, fetches, transfer=self.transfer, deadline=self._deadline()
        )
        return {key for key, (destination, _) in wanted.items() if destination in gone}

    def write(self, key: str, data: bytes) -> FileRecord:
        buffer = bytearray(data)  # a copy with a stable address for the span
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer)) if buffer else 0
        return self.write_stream(key, [(address, len(buffer))] if buffer else [])

    def write_stream(
        self, key: str, spans: Iterable[Span], *, hasher: Hasher | None = None
    ) -> FileRecord:
        return objects.upload(
            self.fs,
            self._path(key),
            self.url(key),
            spans,
            transfer=self.transfer,
            deadline=self._deadline(),
            hasher=hasher,
        )

    def exclusive_creator(self) -> ExclusiveCreate:
        """This back end's exclusive create, checked once (writers that commit call it early).

        Raises:
            StorageCapabilityError: the back end has none and ``single_writer`` is False.
        """
        if self._create is None:
            self._create = exclusive_create(
                self.fs, self.url(), single_writer=self.transfer.single_writer
            )
        return self._create

    def replacer(self) -> ReplaceIf:
        """This back end's conditional replace (for ``overwrite=True``), checked once.

        Raises:
            StorageCapabilityError: the back end has none and ``single_writer`` is False.
        """
        if self._replace is None:
            self._replace = replace_if(
                self.fs, self.url(), single_writer=self.transfer.single_writer
            )
        return self._replace

    def version(self, key: str) -> str:
        """What changes whenever ``key`` is written (its ETag on S3); FileNotFoundError if
        absent."""
        path = self._path(key)
        self.fs.invalidate_cache(path)
        found: str = self._call(
            "version lookup",
            key,
            lambda: object_version(self.fs, path),
            final=(FileNotFoundError,),
        )
        return found

    def replace_if(self, key: str, data: bytes, version: str) -> None:
        """Replace ``key`` with ``data`` only if it is still at ``version``; else
        FileExistsError."""
        path = self._path(key)
        replace = self.replacer()
        self._call(
            "conditional replace",
            key,
            lambda: replace(self.fs, path, data, version),
            final=(FileExistsError, FileNotFoundError),
        )

    def create_exclusive(self, key: str, data: bytes) -> None:
        path = self._path(key)
        create = self.exclusive_creator()
        self._call(
            "exclusive create",
            key,
            lambda: create(self.fs, path, data),
            final=(FileExistsError,),
        )
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        found: bool = self._call("existence check", key, lambda: self.fs.exists(path))
        return found

    def size(self, key: str) -> int:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        info = self._call(
            "size lookup", key, lambda: self.fs.info(path), final=(FileNotFoundError,)
        )
        if info.get("type", "file") != "file":
            raise FileNotFoundError(f"{self.url(key)} is not an object")
        return int(info["size"])

    def keys(self, prefix: str = "", *, maxdepth: int | None = None) -> dict[str, float]:
        return {key: _modified(info) for key, info in self._listing(prefix, maxdepth).items()}

    def sizes(self, prefix: str = "", *, maxdepth: int | None = None) -> dict[str, int]:
        """Keys below ``prefix`` and their sizes in bytes, from one fresh listing."""
        return {key: int(info["size"]) for key, info in self._listing(prefix, maxdepth).items()}

    def _listing(self, prefix: str, maxdepth: int | None) -> dict[str, Any]:
        base = self._path(prefix)
        self.fs.invalidate_cache(self.root)  # s3fs answers listings from a per-instance cache

        def find() -> dict[str, Any]:
            # No maxdepth here: s3fs walks "directories" for one (a LIST per step), while a
            # plain find is one paginated listing of every key below ``base``.
            try:
                found: dict[str, Any] = self.fs.find(base, withdirs=False, detail=True)
            except FileNotFoundError:
                return {}
            return found

        entries = self._call("listing", prefix, find)
        cut = len(self.root) + 1
        depth = base.count("/") + (maxdepth if maxdepth is not None else 1 << 30)
        return {
            name[cut:]: info
            for name, info in entries.items()
            if name.startswith(self.root + "/")
            and info.get("type", "file") == "file"
            and name.count("/") <= depth
        }

    def delete(self, key: str) -> None:
        path = self._path(key)

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

        self._call("delete", key, remove)
        self.fs.invalidate_cache(path)

    def delete_prefix(self, prefix: str) -> None:
        keys = sorted(self.keys(prefix))
        if keys:
            paths = [self._path(key) for key in keys]

            def remove() -> None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(paths)

            self._call("delete", prefix, remove)
        self.fs.invalidate_cache(self._path(prefix))

    def abort_stale_uploads(self, grace_s: float) -> list[str]:
        """Abort incomplete multipart uploads below the root started more than ``grace_s``
        seconds ago (S3 only; the first 1000 listed); return what was aborted."""
        if class_name(self.fs) not in objects.MULTIPART:
            return []
        bucket, key, _ = self.fs.split_path(self.root)
        listing = self._call(
            "listing of multipart uploads",
            "",
            lambda: self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key + "/"),
        )
        aborted = []
        for upload in listing.get("Uploads", []):
            if time.time() - upload["Initiated"].timestamp() > grace_s:
                objects.abort_multipart(self.fs, bucket, upload["Key"], upload["UploadId"])
                aborted.append(f"{self._scheme}://{bucket}/{upload['Key']}")
        return aborted


def _modified(info: Mapping[str, Any]) -> float:
    """An object's modification time as a POSIX timestamp; +inf (never old) when unknown."""
    for field in ("LastModified", "mtime", "created", "updated"):
        value = info.get(field)
        stamp = getattr(value, "timestamp", None)
        if callable(stamp):
            return float(stamp())
        if isinstance(value, (int, float)):
            return float(value)
    return float("inf")


def open_store(
    location: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    transfer: Transfer | None = None,
) -> LocalStore | ObjectStore:
    """The store for a local path or a URL (``s3://bucket/run``, ``memory://x``).

    Raises:
        StorageCapabilityError: see :class:`ObjectStore`.
        ValueError: ``storage_options`` or ``transfer`` given with a local path.
    """
    if is_remote(location):
        return ObjectStore(str(location), storage_options=storage_options, transfer=transfer)
    if storage_options:
        raise ValueError(
            f"storage_options apply to URLs (s3://...), not to the local path {location}"
        )
    return LocalStore(location)
