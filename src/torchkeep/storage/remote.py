"""Object stores through fsspec: which URL is remote, its filesystem, and its exclusive create.

Object stores have no rename, so a commit is an object created *exclusively* (it appears only
if no object of that name exists, atomically on the server). Each back end does that its own
way; the adapter for a filesystem class is looked up in :data:`EXCLUSIVE_CREATE`:

- s3fs (AWS S3 and S3 APIs): ``pipe_file(mode="create")`` sends ``If-None-Match: *``.
- gcsfs: ``pipe_file(mode="create")`` sends ``ifGenerationMatch=0`` (its ``open("xb")`` was seen
  to overwrite on an emulator, so it is never used).
- memory:// (tests): ``pipe_file(mode="create")`` checks the store's dictionary.

Any other filesystem (fsspec's generic ``pipe_file(mode="create")`` is an ``exists()`` check
followed by a write, not atomic) is refused with :class:`~torchkeep.errors.StorageCapabilityError`
unless the caller declares ``Transfer(single_writer=True)``, which warns.

Conditional replace (``overwrite=True``) is looked up the same way in :data:`REPLACE_IF`: S3
``PutObject`` with ``If-Match: <ETag>``, GCS a multipart upload with
``ifGenerationMatch=<generation>`` (:mod:`torchkeep.storage.gcs`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import StorageCapabilityError, missing_dependency
from .gcs import GCS_FILESYSTEMS, gcs_replace_if

# URLs with a scheme of two letters or more; a Windows drive (C:\) is a local path.
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
LOCAL_SCHEMES = ("file", "local")

ExclusiveCreate = Callable[[Any, str, bytes], None]


def _pipe_create(fs: Any, path: str, data: bytes) -> None:
    """The back end's own conditional create (raises ``FileExistsError`` if taken)."""
    fs.pipe_file(path, data, mode="create")


def _check_then_write(fs: Any, path: str, data: bytes) -> None:
    """A create that is exclusive only if no one else writes (``single_writer``)."""
    if fs.exists(path):
        raise FileExistsError(path)
    fs.pipe_file(path, data)


# Fully qualified class names of filesystems whose exclusive create is proven atomic.
EXCLUSIVE_CREATE: dict[str, ExclusiveCreate] = {
    "s3fs.core.S3FileSystem": _pipe_create,
    **dict.fromkeys(GCS_FILESYSTEMS, _pipe_create),
    "fsspec.implementations.memory.MemoryFileSystem": _pipe_create,
}


ReplaceIf = Callable[[Any, str, bytes, str], None]
"""``replace(fs, path, data, version)``: write ``path`` only if it still is at ``version``
(else ``FileExistsError``); versions come from :func:`object_version`."""


def _s3_replace_if(fs: Any, path: str, data: bytes, version: str) -> None:
    """PutObject with ``If-Match: <ETag>`` (S3 answers 412 when the object changed)."""
    from .transfer import status_of

    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
    except OSError as exc:
        if status_of(exc) == "412":
            raise FileExistsError(f"{path} changed since version {version}") from exc
        raise
    fs.invalidate_cache(path)


def _check_then_replace(fs: Any, path: str, data: bytes, version: str) -> None:
    """A replace that is conditional only if no one else writes (memory://, single writer)."""
    if object_version(fs, path) != version:
        raise FileExistsError(f"{path} changed since version {version}")
    fs.pipe_file(path, data)


# The field of ``fs.info()`` that a back end's conditional replace names, by class name.
VERSION_FIELD: dict[str, str] = {
    "s3fs.core.S3FileSystem": "ETag",
    **dict.fromkeys(GCS_FILESYSTEMS, "generation"),
}


def object_version(fs: Any, path: str) -> str:
    """What changes whenever ``path`` is written: the version the back end's conditional
    replace checks (S3's ETag, GCS's generation), else the modification time (memory://)."""
    info = fs.info(path)
    field = VERSION_FIELD.get(class_name(fs))
    if field is not None:
        return str(info[field])
    for field in ("ETag", "generation", "created", "mtime", "LastModified"):
        if info.get(field) is not None:
            return str(info[field])
    return f"size={info.get('size')}"


# Conditional replace (overwrite=True on object storage), by fully qualified class name.
REPLACE_IF: dict[str, ReplaceIf] = {
    "s3fs.core.S3FileSystem": _s3_replace_if,
    **dict.fromkeys(GCS_FILESYSTEMS, gcs_replace_if),
    "fsspec.implementations.memory.MemoryFileSystem": _check_then_replace,  # tests only
}


def replace_if(fs: Any, url: str, *, single_writer: bool) -> ReplaceIf:
    """How to replace an object on ``fs`` only if it did not change since it was read.

    Raises:
        StorageCapabilityError: the back end has no conditional replace here and the caller
            did not declare a single writer.
    """
    adapter = REPLACE_IF.get(class_name(fs))
    if adapter is not None:
        return adapter
    if single_writer:
        return _check_then_replace
    raise StorageCapabilityError(
        f"{url}: overwrite=True needs a conditional replace (S3's If-Match, GCS's "
        f"ifGenerationMatch), which torchkeep does not have for {class_name(fs)}; save under "
        "another step, or pass "
        "transfer=tk.Transfer(single_writer=True) if only one process ever writes there"
    )


def url_scheme(location: object) -> str | None:
    """The scheme of a remote URL (``"s3"``), or None for a local path (``file://`` too)."""
    if not isinstance(location, str):
        return None
    match = _URL.match(location)
    if match is None or match.group(1).lower() in LOCAL_SCHEMES:
        return None
    return match.group(1).lower()


def is_remote(location: object) -> bool:
    """True when ``location`` is a URL that torchkeep hands to fsspec (not a local path)."""
    return url_scheme(location) is not None


def class_name(fs: Any) -> str:
    """``module.Class`` of a filesystem object."""
    return f"{type(fs).__module__}.{type(fs).__qualname__}"


# The package and torchkeep extra that provide a scheme's fsspec filesystem.
_PACKAGES = {
    "s3": ("s3fs", "remote"),
    "s3a": ("s3fs", "remote"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
}


def filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path in it (without the scheme).

    ``storage_options`` go to the filesystem's constructor (``endpoint_url`` is moved into
    s3fs's ``client_kwargs`` for convenience).

    Raises:
        MissingDependencyError: fsspec, or the package of the scheme (s3fs, gcsfs), is absent.
    """
    try:
        import fsspec
    except ImportError:
        raise missing_dependency("fsspec", "remote", f"reading or writing {url}") from None
    scheme = url_scheme(url)
    assert scheme is not None
    options = dict(storage_options or {})
    if scheme in ("s3", "s3a") and "endpoint_url" in options:
        client = dict(options.get("client_kwargs") or {})
        client.setdefault("endpoint_url", options.pop("endpoint_url"))
        options["client_kwargs"] = client
    try:
        fs = fsspec.filesystem(scheme, **options)
    except ImportError as exc:
        package, extra = _PACKAGES.get(scheme, (scheme, "remote"))
        raise missing_dependency(package, extra, f"reading or writing {url}") from exc
    except ValueError as exc:
        raise StorageCapabilityError(
            f"{url}: fsspec knows no filesystem for the scheme {scheme!r} ({exc}); install the "
            "package that provides it or use s3://, gs:// or memory://"
        ) from None
    return fs, fs._strip_protocol(url).rstrip("/")


def exclusive_create(fs: Any, url: str, *, single_writer: bool) -> ExclusiveCreate:
    """How to create an object exclusively on ``fs`` (see the module's documentation).

    Raises:
        StorageCapabilityError: the back end has no atomic exclusive create and the caller did
            not declare a single writer.
    """
    adapter = EXCLUSIVE_CREATE.get(class_name(fs))
    if adapter is not None:
        return adapter
    if not single_writer:
        raise StorageCapabilityError(
            f"{url}: torchkeep has no atomic exclusive create for {class_name(fs)}, so two "
            "writers could both commit one step. Use a supported back end (s3://, gs://, "
            "memory://), or pass transfer=tk.Transfer(single_writer=True) if only one process "
            "ever writes there"
        )
    warnings.warn(
        f"{url}: {class_name(fs)} has no atomic exclusive create; committing with an "
        "exists() check, which is safe only because single_writer=True promises one writer",
        stacklevel=4,
    )
    return _check_then_write
