"""Checkpoint steps on object storage, committed without a rename.

Layout under the root URL (``s3://bucket/run``)::

    step-00000007/manifest.json                   the commit marker, created exclusively last
    step-00000007/3f9a1c02d4e5f607/state.json     data under a per-save id (``data`` in the
    step-00000007/3f9a1c02d4e5f607/model.safetensors  manifest; ``files`` keys are plain names)

Saving: refuse an existing step; upload every file under a fresh save id (tensor files streamed
and hashed on the way); create ``manifest.json`` exclusively. If it exists by then, compare: the
same bytes mean our own create succeeded and its answer was lost (success); other bytes mean
another writer committed first (our save id is deleted, :class:`StepExistsError`). A writer that
dies at any point leaves no manifest, so no step; its data is an orphan that a later save
deletes once it is older than the grace period. Retention deletes the manifest first (the step
disappears at once), then the data. Reading copies the step into a private local folder laid
out like a local step and reads it with the local reader, which hashes every byte before use.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import (
    CorruptFileError,
    RemoteStorageError,
    StepExistsError,
    StorageCapabilityError,
    TorchkeepError,
    TorchkeepFileNotFoundError,
)
from ..formats import safetensors as st
from ..manifest import (
    MANIFEST_LIMITS,
    MANIFEST_NAME,
    FileRecord,
    is_save_id,
    json_bytes,
    manifest_document,
)
from ..storage.store import ObjectStore
from ..storage.transfer import Transfer, is_transient
from .commit import state_document, tensor_metadata
from .entries import Entry
from .layout import KIND, STATE_NAME, StepInfo, parse_step, read_step_manifest, step_path
from .reader import LoadedStep, StepVanishedError, read_step

if TYPE_CHECKING:
    import torch

_SAVE_ID_BYTES = 8  # 16 hex digits: DATA_PREFIX_PATTERN


@dataclass(frozen=True)
class Upload:
    """A save in progress: its step, save id, key prefix, and the manifest it replaces
    (``(version, save id)``, None for a new step)."""

    step: int
    save_id: str
    prefix: str
    previous: tuple[str, str | None] | None


def step_name(step: int) -> str:
    """The key prefix of ``step`` (``step-00000007``)."""
    return step_path(Path(), step).name


class RemoteSteps:
    """The committed steps under one object-store URL: list, save, read, retire, clean.

    With ``fixed_name``, every step number maps to the one step folder of that name under
    the URL (a framework's ``last.ckpt``): saved, read and retired as a step is.

    Raises:
        StorageCapabilityError: the back end cannot create exclusively (and no single writer
            was declared).
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        transfer: Transfer | None = None,
        fixed_name: str | None = None,
    ) -> None:
        self.store = ObjectStore(url, storage_options=storage_options, transfer=transfer)
        self.store.exclusive_creator()  # refuse a back end that cannot commit, before any save
        self.url = self.store.url()
        self.fixed_name = fixed_name

    def name(self, step: int) -> str:
        """The key prefix of ``step``: ``step-00000007``, or the fixed name."""
        return self.fixed_name if self.fixed_name is not None else step_name(step)

    def step_of(self, folder: str) -> int | None:
        """The step a folder name under the URL holds (0 for the fixed name), else None."""
        if self.fixed_name is not None:
            return 0 if folder == self.fixed_name else None
        return parse_step(folder)

    def step_url(self, step: int) -> str:
        """The URL of ``step``'s prefix."""
        return self.store.url(self.name(step))

    # ------------------------------------------------------------------------------------
    # listing

    def committed(self, keep: Path | None = None) -> list[StepInfo]:
        """Every committed step, oldest first: one fresh listing, then each manifest read and
        checked against the schema (a step whose manifest is invalid is not listed).

        With ``keep``, the manifests of the listed steps stay in ``keep/step-<n>/`` (a local
        copy of the folder without its data: :meth:`fetch_files` adds a step's files).
        """
        keys = self.store.keys(maxdepth=2)
        names = sorted(
            key.split("/", 1)[0]
            for key in keys
            if key.endswith("/" + MANIFEST_NAME) and key.count("/") == 1
        )
        infos = []
        with tempfile.TemporaryDirectory(prefix="torchkeep-list-") as scratch:
            folder = Path(scratch) if keep is None else keep
            for name in names:
                step = self.step_of(name)
                if step is None:
                    continue
                try:
                    manifest = self._manifest(step, folder)
                except (TorchkeepFileNotFoundError, CorruptFileError):
                    shutil.rmtree(folder / name, ignore_errors=True)
                    continue  # retired meanwhile, or not a valid step
                infos.append(
                    StepInfo(
                        step=step,
                        path=folder / name if keep is not None else Path(name),
                        created=float(manifest["created"]),
                        metrics={k: float(v) for k, v in manifest.get("metrics", {}).items()},
                        size=sum(record["size"] for record in manifest["files"].values()),
                        manifest=manifest,
                    )
                )
        return infos

    def exists(self, step: int) -> bool:
        """Whether ``step`` has a manifest now (valid or not)."""
        return self.store.exists(f"{self.name(step)}/{MANIFEST_NAME}")

    def _manifest(self, step: int, scratch: Path) -> dict[str, Any]:
        """Fetch and check ``step``'s manifest into ``scratch/step-<n>/`` (which it creates).

        Raises:
            StepVanishedError: there is no manifest (now).
            CorruptFileError: the manifest is invalid.
        """
        name = self.name(step)
        local = scratch / name
        local.mkdir(exist_ok=True)
        try:
            data = self.store.read(f"{name}/{MANIFEST_NAME}")
        except FileNotFoundError:
            raise StepVanishedError(f"{self.step_url(step)} has no {MANIFEST_NAME}") from None
        (local / MANIFEST_NAME).write_bytes(data)
        try:
            manifest = read_step_manifest(local)
        except TorchkeepError as exc:
            raise relabelled(exc, local, self.step_url(step)) from None
        return manifest

    def data_prefix(self, step: int, manifest: Mapping[str, Any]) -> str:
        """The key prefix of the files of the committed ``step`` whose manifest is ``manifest``:
        its save-id prefix (``step-00000007/3f9a1c02...``), or the step's own prefix for a
        step without one (a local step folder uploaded with ``aws s3 sync``: its files lie
        next to its manifest)."""
        data = manifest.get("data")
        return self.name(step) if data is None else f"{self.name(step)}/{data}"

    # ------------------------------------------------------------------------------------
    # saving

    def commit(
        self,
        step: int,
        entries: Sequence[Entry],
        *,
        overwrite: bool,
        manifest_fields: Mapping[str, Any],
    ) -> None:
        """Upload ``entries`` as ``step`` and commit it by its manifest, created exclusively
        (or, with ``overwrite``, replaced only if it did not change since it was read).

        Raises:
            StepExistsError: the step exists and ``overwrite`` is False, or another writer
                committed (or replaced) it while this one uploaded; this save's data is deleted.
            StorageCapabilityError: ``overwrite=True`` on a back end without a conditional
                replace.
            RemoteStorageError: the store failed for good or the deadline passed; no
                manifest was created by this save.
        """
        with self.store.deadline():
            upload = self.begin(step, overwrite=overwrite)
            try:
                files = self._upload(upload.prefix, step, entries)
            except BaseException:
                self.abort(upload)
                raise
            self.finish(upload, files, manifest_fields)

    def begin(self, step: int, *, overwrite: bool) -> Upload:
        """Start a save of ``step``: refuse an existing step (without ``overwrite``), pick a
        fresh save id; the data goes under ``Upload.prefix``, then :meth:`finish` commits.

        Raises:
            StepExistsError: the step exists and ``overwrite`` is False.
            StorageCapabilityError: ``overwrite=True`` on a back end without a conditional
                replace.
        """
        previous = self._previous(step) if overwrite else None
        if previous is None and self.exists(step):
            raise StepExistsError(
                f"checkpoint step {step} already exists at {self.step_url(step)}; pass "
                "overwrite=True to replace it, or save under another step"
            )
        save_id = secrets.token_hex(_SAVE_ID_BYTES)
        return Upload(step, save_id, f"{self.name(step)}/{save_id}", previous)

    def abort(self, upload: Upload) -> None:
        """Delete what a failed save uploaded (best effort: else an orphan for a later save)."""
        with contextlib.suppress(Exception):
            self.store.delete_prefix(upload.prefix)

    def finish(
        self,
        upload: Upload,
        files: Mapping[str, FileRecord],
        manifest_fields: Mapping[str, Any],
        *,
        format_version: int | None = None,
    ) -> None:
        """Commit ``upload`` (its ``files`` are all uploaded) by creating its manifest
        exclusively, or replacing the previous one conditionally; then delete the replaced
        step's data.

        Raises:
            StepExistsError: another writer committed (or replaced) the step meanwhile; this
                save's data is deleted.
        """
        step = upload.step
        manifest = manifest_document(
            kind=KIND,
            files=files,
            format_version=format_version,
            source=self.store.url(f"{self.name(step)}/{MANIFEST_NAME}"),
            step=step,
            data=upload.save_id,
            **manifest_fields,
        )
        # From here on the data is never deleted on error: a create whose answer was lost
        # may have committed it. An uncommitted prefix is an orphan for a later save.
        self._commit_manifest(step, upload.prefix, json_bytes(manifest), upload.previous)
        previous = upload.previous
        if previous is not None:
            with contextlib.suppress(Exception):  # an orphan for a later save otherwise
                if previous[1] is not None:
                    self.store.delete_prefix(f"{self.name(step)}/{previous[1]}")
                else:
                    self._delete_loose_files(step)

    def _delete_loose_files(self, step: int) -> None:
        """Delete the objects right under ``step``'s prefix but its manifest: the files of a
        step uploaded from a local folder (no save id), which this save replaced; the new
        manifest lists only objects under its own save id."""
        name = self.name(step)
        for key in self.store.keys(name):
            if key.count("/") == 1 and key != f"{name}/{MANIFEST_NAME}":
                self.store.delete(key)

    def _previous(self, step: int) -> tuple[str, str | None] | None:
        """``(version, save id)`` of the manifest ``step`` has now, None when it has none."""
        key = f"{self.name(step)}/{MANIFEST_NAME}"
        self.store.replacer()  # refuse overwrite=True on a back end that cannot do it
        try:
            version = self.store.version(key)  # first: a change after it fails the replace
            document = json.loads(self.store.read(key, start=0, end=MANIFEST_LIMITS.max_bytes))
        except FileNotFoundError:
            return None
        except ValueError:  # not JSON: replaced all the same, its data is left as an orphan
            return version, None
        data = document.get("data") if isinstance(document, dict) else None
        return version, data if isinstance(data, str) and is_save_id(data) else None

    def _upload(self, prefix: str, step: int, entries: Sequence[Entry]) -> dict[str, FileRecord]:
        files: dict[str, FileRecord] = {}
        for entry in entries:
            if entry.file_name is not None:
                spans = st.encode(entry.tensors, tensor_metadata(entry))
                files[entry.file_name] = self.store.write_stream(
                    f"{prefix}/{entry.file_name}", spans
                )
        state = json_bytes(state_document(step, entries), sort_keys=False)
        files[STATE_NAME] = self.store.write(f"{prefix}/{STATE_NAME}", state)
        return files

    def _commit_manifest(
        self, step: int, prefix: str, manifest: bytes, previous: tuple[str, str | None] | None
    ) -> None:
        key = f"{self.name(step)}/{MANIFEST_NAME}"
        try:
            if previous is None:
                self.store.create_exclusive(key, manifest)
            else:
                self.store.replace_if(key, manifest, previous[0])
            return
        except (FileExistsError, FileNotFoundError):
            pass
        except RemoteStorageError as exc:
            if _may_have_landed(exc):
                raise RemoteStorageError(
                    f"{exc}. The manifest was sent and no answer came back, so it may still "
                    f"reach the server: step {step} can appear at {self.step_url(step)} later, "
                    "complete and verifiable (its data was uploaded first). List the steps "
                    "before saving it again",
                    url=exc.url,
                    operation=exc.operation,
                    attempts=exc.attempts,
                    status=exc.status,
                ) from exc
            raise
        try:
            existing = self.store.read(key)
        except FileNotFoundError:
            existing = None  # retired meanwhile: not ours either way
        if existing == manifest:
            return  # our write succeeded; its answer was lost and the retry saw our object
        with contextlib.suppress(Exception):
            self.store.delete_prefix(prefix)
        raise StepExistsError(
            f"checkpoint step {step} was committed at {self.step_url(step)} by another writer "
            "while this one was uploading it; this save was discarded. Save under another step"
        )

    # ------------------------------------------------------------------------------------
    # retention and cleaning

    def retire(self, infos: Sequence[StepInfo]) -> None:
        """Delete steps: each manifest first (the step disappears at once), then its data."""
        for info in infos:
            self.retire_step(info.step)

    def retire_step(self, step: int) -> None:
        """Delete ``step``: its manifest first (it disappears at once), then its data."""
        name = self.name(step)
        self.store.delete(f"{name}/{MANIFEST_NAME}")
        self.store.delete_prefix(name)

    def clean_orphans(self, committed: Sequence[StepInfo]) -> list[str]:
        """Delete save-id prefixes no committed manifest references and incomplete multipart
        uploads, once older than ``Transfer.orphan_grace_s`` (a writer may still be
        uploading); return the URLs of what was deleted."""
        grace = self.store.transfer.orphan_grace_s
        now = time.time()
        referenced = {(self.name(info.step), info.manifest.get("data")) for info in committed}
        # a step uploaded from a local folder lists objects right under its prefix: a name
        # there is never deleted as a prefix (a listed object named like a save id)
        referenced |= {
            (self.name(info.step), file)
            for info in committed
            if "data" not in info.manifest
            for file in info.manifest["files"]
        }
        newest: dict[tuple[str, str], float] = {}
        for key, modified in self.store.keys(maxdepth=3).items():
            parts = key.split("/")
            if len(parts) == 3 and self.step_of(parts[0]) is not None and is_save_id(parts[1]):
                group = (parts[0], parts[1])
                newest[group] = max(newest.get(group, float("-inf")), modified)
        removed = []
        for (name, save_id), modified in sorted(newest.items()):
            if (name, save_id) not in referenced and now - modified > grace:
                self.store.delete_prefix(f"{name}/{save_id}")
                removed.append(self.store.url(f"{name}/{save_id}"))
        return removed + self.store.abort_stale_uploads(grace)

    # ------------------------------------------------------------------------------------
    # reading

    def read(
        self, step: int, *, into: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    ) -> LoadedStep:
        """Copy ``step`` into a private local folder and read it with every byte verified
        (``into`` as for :func:`~torchkeep.checkpoint.reader.read_step`).

        Raises:
            StepVanishedError: the step was retired while it was read.
            CorruptFileError: a file is missing, has the wrong size or fails its hash.
        """
        with tempfile.TemporaryDirectory(prefix="torchkeep-remote-") as scratch:
            local = self.fetch(step, Path(scratch))
            try:
                return read_step(local, into=into)
            except TorchkeepError as exc:
                raise relabelled(exc, local, self.step_url(step)) from None

    def fetch(self, step: int, scratch: Path, *, only: Collection[str] | None = None) -> Path:
        """Copy ``step`` into ``scratch/step-<n>/`` laid out as a local step (not verified:
        the local reader or verifier hashes it); return that folder. With ``only``, just
        those of its files (a sharded step's ``state.json``: ranks read shards by ranges).

        Raises:
            StepVanishedError: the step was retired or replaced while it was read.
            CorruptFileError: a file the manifest lists is missing.
        """
        with self.store.deadline():
            manifest = self._manifest(step, scratch)
            local = scratch / self.name(step)
            missing = self.fetch_files(step, manifest, local, only=only)
            if missing and self._replaced(step, local / MANIFEST_NAME):
                raise StepVanishedError(
                    f"{self.step_url(step)} was retired or replaced while it was read"
                )
        if missing:
            raise CorruptFileError(f"{missing[0]} is missing; the step is damaged")
        return local

    def fetch_files(
        self,
        step: int,
        manifest: Mapping[str, Any],
        local: Path,
        *,
        only: Collection[str] | None = None,
    ) -> list[str]:
        """Copy the files ``manifest`` lists (those in ``only``, when given) into ``local``
        (the step's local copy, laid out as on the bucket: under the data folder its manifest
        names, if any),
        concurrently: at most ``Transfer.max_concurrency`` requests in flight, all within one
        deadline. Not verified: the local reader or verifier hashes them. Return the URLs of
        listed files that are missing (no local file is left for them).
        """
        base = self.data_prefix(step, manifest)
        folder = local / manifest["data"] if "data" in manifest else local
        folder.mkdir(exist_ok=True)
        with self.store.deadline():
            missing = self.store.download_many(
                {
                    f"{base}/{file}": (folder / file, record["size"])
                    for file, record in manifest["files"].items()
                    if only is None or file in only
                }
            )
        return sorted(self.store.url(key) for key in missing)

    def data_key(self, step: int, manifest: Mapping[str, Any], file: str) -> str:
        """The key of ``file`` of the committed ``step`` whose manifest is ``manifest``."""
        return f"{self.data_prefix(step, manifest)}/{file}"

    def _replaced(self, step: int, used: Path) -> bool:
        """Whether ``step``'s manifest is gone or differs from the copy at ``used``."""
        try:
            return self.store.read(f"{self.name(step)}/{MANIFEST_NAME}") != used.read_bytes()
        except FileNotFoundError:
            return True


def refuse_overwrite(url: str, overwrite: bool) -> None:
    """Raise when ``overwrite=True`` is asked of a remote writer that has no conditional
    replace (``torchkeep convert --force`` into a bucket's checkpoint folder)."""
    if overwrite:
        raise StorageCapabilityError(
            f"{url}: replacing an existing checkpoint step this way is not supported on object "
            "storage; write to another step, or save it with CheckpointManager.save(..., "
            "overwrite=True), which replaces a step conditionally"
        )


def _may_have_landed(exc: RemoteStorageError) -> bool:
    """Whether a request that failed this way may still have been carried out: it was sent,
    and no answer refused it (a refusal is final; a lost answer, a 5xx or the deadline leave
    the outcome unknown)."""
    cause = exc.__cause__
    return exc.attempts > 0 and (cause is None or is_transient(cause))


def relabelled(exc: TorchkeepError, local: Path, url: str) -> TorchkeepError:
    """``exc`` with the private local copy's path in its message replaced by the step URL."""
    message = str(exc).replace(str(local), url)
    try:
        return type(exc)(message)
    except TypeError:
        return exc
