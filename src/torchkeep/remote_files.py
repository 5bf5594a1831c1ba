"""Public functions on URLs: fetch into a private local folder, run the local code, upload.

Every format check torchkeep has lives in its local readers and writers; on a URL
(``s3://bucket/net.safetensors``, ``memory://x``, any fsspec URL) they run unchanged:

- Reading (:func:`fetched`): the object, or the committed folder (its ``manifest.json`` first,
  then exactly the files the manifest lists, from the data prefix it names), is downloaded
  through the storage seam (concurrent ranged reads, retried, bounded by the transfer's
  deadline) into a private temporary folder laid out as the local one would be. The local
  function then checks and hashes every byte as it does on disk (a flipped byte, an unlisted
  entry, a hostile header are refused by the same code), and its errors name the URL.
- Writing: a file is uploaded as one object, which appears whole or not at all (S3 completes a
  multipart upload atomically); a folder (a bundle) is uploaded under a fresh data prefix and
  committed by creating ``manifest.json`` exclusively last (:func:`commit_folder`).

Remote folder layout (shared with checkpoint steps on object storage)::

    <url>/manifest.json            the commit marker, created last, names the data prefix
    <url>/<data id>/<file>         every file the manifest lists
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import lazy
from .errors import (
    ChecksumMismatchError,
    CorruptFileError,
    DestinationExistsError,
    StorageCapabilityError,
    TorchkeepError,
    TorchkeepFileNotFoundError,
)
from .manifest import MANIFEST_LIMITS, MANIFEST_NAME, FileRecord, json_bytes, read_manifest
from .storage.remote import is_remote
from .storage.stream import Span

if TYPE_CHECKING:
    from .checkpoint.layout import StepInfo
    from .checkpoint.lazy import Fetch
    from .checkpoint.remote import RemoteSteps
    from .storage.store import ObjectStore
    from .storage.transfer import Transfer

StorageOptions = Mapping[str, Any]
_READ_CHUNK = 8 << 20
# At most this many objects are mirrored from one folder (as many as a local bundle may hold).
MAX_OBJECTS = 10_000
_SAFE_NAME = re.compile(r"[^/\\\x00]{1,255}")
_STEP_MANIFEST = re.compile(r"step-[0-9]+/" + re.escape(MANIFEST_NAME))


@dataclass(frozen=True)
class Remote:
    """A URL with the options that reach it.

    Attributes:
        url: the object or folder (``s3://bucket/dir/net.safetensors``).
        storage_options: passed to the fsspec filesystem (credentials, ``endpoint_url``...).
        transfer: part size, parallelism, retries and the deadline of one call.
    """

    url: str
    storage_options: StorageOptions | None = None
    transfer: Transfer | None = None

    @property
    def name(self) -> str:
        """The last part of the URL (the object's or folder's own name)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def store(self) -> ObjectStore:
        """The store rooted at the URL's parent (the object is its key :attr:`name`)."""
        from .storage.store import ObjectStore

        trimmed = self.url.rstrip("/")
        parent = trimmed.rsplit("/", 1)[0]
        if parent.endswith(":/") or "/" not in trimmed.split("://", 1)[1]:
            raise TorchkeepFileNotFoundError(
                f"{self.url} names a bucket, not an object or folder in it; add a name "
                "(s3://bucket/net.safetensors)"
            )
        return ObjectStore(parent, storage_options=self.storage_options, transfer=self.transfer)


def remote_or_none(
    location: str | os.PathLike[str],
    storage_options: StorageOptions | None,
    transfer: Transfer | None,
) -> Remote | None:
    """A :class:`Remote` for a URL; None for a local path (which takes no options).

    Raises:
        StorageCapabilityError: ``storage_options`` or ``transfer`` given with a local path
            (a ``ValueError``).
    """
    if is_remote(location):
        return Remote(str(location), storage_options, transfer)
    if storage_options or transfer is not None:
        raise StorageCapabilityError(
            f"storage_options= and transfer= apply to URLs (s3://..., memory://...), not to the "
            f"local path {os.fspath(location)!r}; drop them or pass a URL"
        )
    return None


def refuse_url(location: str | os.PathLike[str]) -> None:
    """Refuse a URL where only a local path works (ONNX export writes local files).

    Raises:
        StorageCapabilityError: ``location`` is a URL.
    """
    if is_remote(location):
        raise StorageCapabilityError(
            f"{location}: ONNX export writes local files only (the exporter and onnx save the "
            "model and its external data as files); export to a local path, then upload it"
        )


def remote_for(
    location: str | os.PathLike[str],
    storage_options: StorageOptions | None,
    transfer: Transfer | None,
) -> Remote | None:
    """A :class:`Remote` for a URL, None for a local path: for functions taking two locations,
    where the options go to whichever of them is a URL."""
    return Remote(str(location), storage_options, transfer) if is_remote(location) else None


def check_options_used(
    locations: Iterable[str | os.PathLike[str]],
    storage_options: StorageOptions | None,
    transfer: Transfer | None,
) -> None:
    """Refuse ``storage_options``/``transfer`` when no location is a URL (see
    :func:`remote_or_none`)."""
    if not any(is_remote(location) for location in locations):
        for location in locations:
            remote_or_none(location, storage_options, transfer)


@contextlib.contextmanager
def local_copy(
    location: str | os.PathLike[str],
    storage_options: StorageOptions | None,
    transfer: Transfer | None,
) -> Iterator[Path]:
    """``location`` itself when local, else the fetched copy of the URL (see :func:`fetched`)."""
    remote = remote_for(location, storage_options, transfer)
    if remote is None:
        yield Path(location)
        return
    with fetched(remote) as local:
        yield local


# --------------------------------------------------------------------------------------------
# naming the URL in errors


def _renamed(exc: BaseException, local: str, url: str) -> None:
    exc.args = tuple(a.replace(local, url) if isinstance(a, str) else a for a in exc.args)


@contextlib.contextmanager
def naming(local: Path, url: str) -> Iterator[None]:
    """Re-raise torchkeep errors of the block with ``local`` replaced by ``url`` in the message."""
    try:
        yield
    except TorchkeepError as exc:
        _renamed(exc, str(local), url)
        raise


# --------------------------------------------------------------------------------------------
# reading


def _safe_relative(key: str, url: str) -> Path:
    parts = key.split("/")
    if not all(_SAFE_NAME.fullmatch(p) and p not in (".", "..") for p in parts):
        raise CorruptFileError(
            f"{url} holds an object named {key!r}, which cannot be a file name in a folder "
            "(an empty, '.' or '..' part); this prefix was not written by torchkeep"
        )
    return Path(*parts)


def _mirror_committed(
    store: ObjectStore, remote: Remote, prefix: str, keys: Iterable[str], local: Path
) -> None:
    """Fetch a committed folder: its manifest, then the files it lists from its data prefix
    (concurrently; each at most one byte more than the size the manifest records, so a
    longer object leaves a longer file, which the local size check refuses, and a hostile
    manifest cannot make it read more; a missing object leaves no file, which the local
    check reports).

    Objects under the data prefix that the manifest does not list become empty placeholders,
    so the local checks refuse them by name as they refuse an unlisted local file; objects
    under other prefixes (uploads of saves that never committed) are not part of the folder.
    """
    local.mkdir(parents=True, exist_ok=True)
    manifest_key = f"{prefix}/{MANIFEST_NAME}"
    store.download_many({manifest_key: (local / MANIFEST_NAME, MANIFEST_LIMITS.max_bytes)})
    try:
        manifest = read_manifest(local)
    except TorchkeepError:
        return  # the local reader will say what is wrong with it
    data = manifest.get("data")
    base = f"{prefix}/{data}/" if data else f"{prefix}/"
    folder = local / data if data else local  # laid out as on the bucket
    folder.mkdir(exist_ok=True)
    listed = manifest["files"]
    store.download_many(
        {base + name: (folder / name, int(record["size"])) for name, record in listed.items()}
    )
    unlisted = [k for k in keys if k.startswith(base) and k[len(base) :] not in listed]
    for key in unlisted[:MAX_OBJECTS]:
        if key != manifest_key:
            _placeholder(folder, _safe_relative(key[len(base) :], remote.url))


def _placeholder(local: Path, relative: Path) -> None:
    """An empty local entry standing for an object nobody lists (the local checks name it)."""
    path = local / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _mirror(store: ObjectStore, remote: Remote, local: Path, sizes_only: bool) -> Fetch | None:
    """Lay out ``remote`` under ``local`` as the local folder (or file) would be; for a
    checkpoint folder, return what fetches a step's files when a reader needs them."""
    name = remote.name
    keys = [k for k in store.keys(name) if k == name or k.startswith(name + "/")]
    if not keys:
        raise TorchkeepFileNotFoundError(
            f"{remote.url} does not exist (no object, and no objects under it); check the URL "
            "and the storage options (endpoint, credentials)"
        )
    if name in keys:
        store.download_many({name: (local, None)})
        return None
    if f"{name}/{MANIFEST_NAME}" in keys:
        _mirror_committed(store, remote, name, keys, local)
        return None
    if any(_STEP_MANIFEST.fullmatch(k[len(name) + 1 :]) for k in keys):
        return _mirror_checkpoint(remote, local, sizes_only)
    if len(keys) > MAX_OBJECTS:
        raise CorruptFileError(
            f"{remote.url} holds more than {MAX_OBJECTS} objects; torchkeep reads folders of "
            "at most that many"
        )
    wanted = {}  # any other folder (a save_pretrained folder): every object
    for key in keys:
        path = local / _safe_relative(key[len(name) + 1 :], remote.url)
        path.parent.mkdir(parents=True, exist_ok=True)
        wanted[key] = (path, None)
    store.download_many(wanted)
    return None


class _StepsOnDemand:
    """What fetches a step of a remote checkpoint folder's local copy when a reader needs it
    (:func:`torchkeep.checkpoint.lazy.need`): its files, concurrently, after deleting the files
    of the step fetched before (its manifest stays), so one step's files are on disk at a time.

    With ``sizes`` (every object's size, from one listing) no data is read: each file gets an
    empty, sparse stand-in of its object's size instead (none for a missing object), enough
    for the local size checks (``ls --no-hash``), never for reading.
    """

    def __init__(
        self, steps: RemoteSteps, infos: Iterable[StepInfo], sizes: Mapping[str, int] | None
    ) -> None:
        self.steps, self.sizes = steps, sizes
        self.infos = {info.path: info for info in infos}
        self.present: Path | None = None

    def __call__(self, folder: Path) -> None:
        info = self.infos.get(folder)
        if info is None or folder == self.present:
            return
        if self.present is not None:
            for entry in self.present.iterdir():
                if entry.is_dir():  # the data folder a step's manifest names
                    shutil.rmtree(entry)
                elif entry.name != MANIFEST_NAME:
                    entry.unlink()
            self.present = None
        if self.sizes is None:
            self.steps.fetch_files(info.step, info.manifest, folder)  # missing: reader says so
        else:
            self._stand_ins(info, self.sizes)
        self.present = folder

    def _stand_ins(self, info: StepInfo, sizes: Mapping[str, int]) -> None:
        base = self.steps.data_prefix(info.step, info.manifest)
        data = info.manifest.get("data")
        folder = info.path / data if data else info.path
        folder.mkdir(exist_ok=True)
        for name in info.manifest["files"]:
            size = sizes.get(f"{base}/{name}")
            if size is not None:
                with open(folder / name, "wb") as f:
                    f.truncate(size)


def _mirror_checkpoint(remote: Remote, local: Path, sizes_only: bool) -> Fetch:
    """A checkpoint folder: its committed steps' manifests now (on object storage a step
    without a manifest is a save in progress or a crashed one, not a step), each step's files
    when a reader needs them (with ``sizes_only``, stand-ins of their sizes)."""
    from .checkpoint.remote import RemoteSteps

    steps = RemoteSteps(
        remote.url, storage_options=remote.storage_options, transfer=remote.transfer
    )
    local.mkdir(parents=True, exist_ok=True)
    infos = steps.committed(keep=local)
    return _StepsOnDemand(steps, infos, steps.store.sizes() if sizes_only else None)


@contextlib.contextmanager
def fetched(remote: Remote, *, sizes_only: bool = False) -> Iterator[Path]:
    """Download ``remote`` into a private temporary folder and yield its local path.

    A file or a committed folder (bundle, step) is fetched whole before the block runs. A
    checkpoint folder is fetched as its committed steps' manifests; each step's files arrive
    when a reader of the block needs them (:mod:`torchkeep.checkpoint.lazy`), one step on disk
    at a time. With ``sizes_only`` a step's files are empty stand-ins of the objects' sizes
    (from one listing; no data object is read): only for size checks.

    The local path ends with the URL's own name; errors and warnings raised inside the block
    name the URL instead of it. Everything is deleted when the block ends (tensors
    memory-mapped from a fetched file stay readable: the mapping outlives the name).

    Raises:
        TorchkeepFileNotFoundError: nothing is at the URL.
        RemoteStorageError: a read failed for good or the transfer's deadline passed.
        StorageCapabilityError / MissingDependencyError: from the storage seam.
    """
    store = remote.store()
    with tempfile.TemporaryDirectory(prefix="torchkeep-fetch-") as folder:
        local = Path(folder) / remote.name
        with naming(local, remote.url), _warnings_naming(local, remote.url):
            with store.deadline():
                on_demand = _mirror(store, remote, local, sizes_only)
            with lazy.fetching(on_demand) if on_demand else contextlib.nullcontext():
                yield local


@contextlib.contextmanager
def _warnings_naming(local: Path, url: str) -> Iterator[None]:
    """Re-issue the warnings of the block with ``local`` replaced by ``url`` in the text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            held = list(caught)
    for w in held:
        text = str(w.message).replace(str(local), url)
        warnings.warn_explicit(text, w.category, w.filename, w.lineno)


# --------------------------------------------------------------------------------------------
# writing


def file_spans(path: Path) -> Iterator[Span]:
    """The bytes of the file at ``path`` as spans of one reused buffer (the uploader copies
    each span before asking for the next)."""
    buffer = bytearray(_READ_CHUNK)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            yield address, n


def upload_spans(remote: Remote, spans: Iterable[Span]) -> FileRecord:
    """Write the memory of ``spans`` as the object at the URL, whole or not at all."""
    store = remote.store()
    with store.deadline():
        return store.write_stream(remote.name, spans)


def upload_file(local: Path, remote: Remote) -> FileRecord:
    """Upload the local file ``local`` as the object at the URL, whole or not at all."""
    return upload_spans(remote, file_spans(local))


@dataclass(frozen=True)
class _Committed:
    """What a committed folder's manifest declares: its kind and its data prefix."""

    kind: object
    data: str | None


def _committed(store: ObjectStore, key: str) -> _Committed | None:
    """The folder whose manifest is ``key``, or None when there is none."""
    try:
        document = json.loads(store.read(key, start=0, end=MANIFEST_LIMITS.max_bytes))
    except FileNotFoundError:
        return None
    except ValueError:
        return _Committed(None, None)
    if not isinstance(document, dict):
        return _Committed(None, None)
    data = document.get("data")
    valid = isinstance(data, str) and re.fullmatch("[0-9a-f]{16}", data)
    return _Committed(document.get("format"), data if valid else None)


def commit_folder(local: Path, remote: Remote, *, replace: str | None = None) -> None:
    """Upload the committed local folder ``local`` (files and ``manifest.json``) to the URL.

    Every file the manifest lists goes under a fresh data prefix, and each upload's size and
    hash must equal the manifest's record; then ``manifest.json`` (naming the prefix) is
    created exclusively: the commit. A committed folder already there is replaced only if its
    manifest declares the kind ``replace`` (``"torchkeep.bundle"``): its manifest is deleted
    first (the old folder disappears whole), its data once the new folder is committed. A
    failed upload deletes what it wrote and leaves no manifest.

    Raises:
        DestinationExistsError: a folder is there that may not be replaced, or another writer
            committed one while this upload ran.
        ChecksumMismatchError: a local file changed while it was uploaded.
        RemoteStorageError: an upload failed for good or the deadline passed.
    """
    store = remote.store()
    name, manifest_key = remote.name, f"{remote.name}/{MANIFEST_NAME}"
    manifest = json.loads((local / MANIFEST_NAME).read_bytes())  # written by torchkeep just now
    data_id = secrets.token_hex(8)
    with store.deadline():
        old = _committed(store, manifest_key)
        if old is not None and (replace is None or old.kind != replace):
            raise DestinationExistsError(
                f"{remote.url} already holds a committed folder that is not a {replace}; "
                "choose another URL or delete it first"
            )
        try:
            for file_name, record in manifest["files"].items():
                sent = store.write_stream(
                    f"{name}/{data_id}/{file_name}", file_spans(local / file_name)
                )
                if sent != FileRecord(record["size"], record["hash"]):
                    raise ChecksumMismatchError(
                        f"{local / file_name} changed while it was uploaded to {remote.url}; "
                        "nothing was committed, save again"
                    )
            document = json_bytes({**manifest, "data": data_id})
            if old is not None:
                store.delete(manifest_key)  # the old folder disappears whole, then the new one
            _create_manifest(store, remote, manifest_key, document)
        except BaseException:
            store.delete_prefix(f"{name}/{data_id}")
            raise
        if old is not None and old.data is not None:
            store.delete_prefix(f"{name}/{old.data}")


def _create_manifest(store: ObjectStore, remote: Remote, key: str, document: bytes) -> None:
    """Create the manifest exclusively; an existing one with our very bytes is our own create
    whose answer was lost (the retry saw it), anything else another writer's commit."""
    try:
        store.create_exclusive(key, document)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if store.read(key) == document:
                return
        raise DestinationExistsError(
            f"another writer committed {remote.url} while this save ran; this save's files "
            "were deleted and the other writer's folder was left as it is"
        ) from None
