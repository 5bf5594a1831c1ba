"""Where a framework's checkpoint goes: a local path, or a step on object storage.

Every location a user or a framework hands an integration (``ModelCheckpoint(dirpath=
"s3://bucket/run")`` makes Lightning pass ``s3://bucket/run/last.ckpt``) passes through here
once. ``Path("s3://bucket/x")`` is the *local* path ``s3:/bucket/x``: an integration that
turned a URL into a ``Path`` would write a local folder named ``s3:`` and never reach the
bucket. So a URL is either opened as a step on object storage (:func:`remote_step`) or
refused by name (:func:`local_path`), never made a ``Path``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StorageCapabilityError
from ..remote_files import remote_or_none
from ..storage.remote import is_remote

if TYPE_CHECKING:
    from ..checkpoint.remote import RemoteSteps
    from ..storage.store import ObjectStore
    from ..storage.transfer import Transfer

Location = str | os.PathLike[str]
"""A local path or a URL, as frameworks pass them."""


def local_path(location: Location, *, feature: str, fix: str) -> Path:
    """``location`` as a local path; a URL is refused before anything is written.

    Args:
        location: what the user or the framework passed.
        feature: what cannot take a URL (``"TorchkeepTrainer"``), for the message.
        fix: the way out, for the message.

    Raises:
        StorageCapabilityError: ``location`` is a URL (``s3://...``), named with the fix.
    """
    if is_remote(location):
        raise StorageCapabilityError(
            f"{feature} cannot write or read {os.fspath(location)}: it works on local "
            f"paths only, and a URL made a local path would be a folder named "
            f"{os.fspath(location).split('/', 1)[0]!r}; {fix}"
        )
    return Path(location)


def locate(
    location: Location,
    storage_options: Mapping[str, Any] | None,
    transfer: Transfer | None,
) -> Path | RemoteSteps:
    """The step folder at ``location``: a local ``Path``, or for a URL
    (``s3://bucket/run/last.ckpt``) the step on object storage.

    The step has the layout of every step on object storage (``last.ckpt/manifest.json``,
    created or conditionally replaced last, naming the data under ``last.ckpt/<save id>/``),
    so ``tk.verify``, ``tk.load_state_dict`` and ``torchkeep ls`` read it as they read any.

    Raises:
        StorageCapabilityError: options given with a local path; a back end that cannot
            commit; a URL that names a bucket, not a folder in it.
    """
    remote = remote_or_none(location, storage_options, transfer)
    if remote is None:
        return Path(location)
    from ..checkpoint.remote import RemoteSteps

    trimmed = remote.url.rstrip("/")
    parent, name = trimmed.rsplit("/", 1)
    if parent.endswith(":/") or "/" not in trimmed.split("://", 1)[1]:
        raise StorageCapabilityError(
            f"{remote.url} names a bucket, not a checkpoint in it; add a folder "
            "(s3://bucket/run/last.ckpt)"
        )
    return RemoteSteps(parent, storage_options=storage_options, transfer=transfer, fixed_name=name)


def folder(
    location: Location,
    storage_options: Mapping[str, Any] | None,
    transfer: Transfer | None,
) -> Path | ObjectStore:
    """The folder at ``location`` to list: a local ``Path``, or the store rooted at the URL.

    Raises:
        StorageCapabilityError: options given with a local path.
    """
    remote = remote_or_none(location, storage_options, transfer)
    if remote is None:
        return Path(location)
    from ..storage.store import ObjectStore

    return ObjectStore(remote.url, storage_options=storage_options, transfer=transfer)
