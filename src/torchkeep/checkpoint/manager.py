"""The CheckpointManager: save training state per step, keep the right steps, resume exactly."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn

from .. import tree
from ..errors import (
    CheckpointBusyError,
    CheckpointNotFoundError,
    CorruptFileError,
    FormatVersionError,
    StateDictMismatchError,
    StepExistsError,
    TorchkeepError,
    TorchkeepFileNotFoundError,
    UnsupportedValueError,
    first_line,
)
from ..paths import lookup
from ..storage.cache import CachePolicy, check_cache_policy
from ..storage.local import remove_stale_temps, temp_sibling
from ..storage.remote import is_remote
from ..storage.transfer import Transfer
from ..unwrap import matching_view
from ..weights import has_custom_loading, undo_on_error
from . import precheck, retention, rng
from .asynchronous import BackgroundWriter, Remover, SnapshotBuffers
from .commit import write_step
from .entries import Entry, as_stateful, prepare
from .layout import (
    MAX_STEP,
    RNG_ENTRY,
    StepInfo,
    list_steps,
    parse_step,
    read_step_manifest,
    step_path,
    uncommitted_steps,
)
from .reader import LoadedStep, StepVanishedError, read_step
from .remote import RemoteSteps, relabelled

STATE_SLOTS = ("model", "optimizer", "scheduler", "scaler")
# How often a reader looks for the newest step again after a concurrent writer retired the
# one it was reading, before giving up with CheckpointBusyError.
RACE_ROUNDS = 100


@dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` loaded.

    Attributes:
        step: the step restored.
        metrics: the metrics saved with it.
        extra: the plain values saved with it (``epoch=3`` -> ``extra["epoch"]``).
        path: the step directory (its URL on object storage).
    """

    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | str | None = None


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be a non-negative int (at most {MAX_STEP}), not {step!r}")
    return step


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    result = {}
    for name, value in (metrics or {}).items():
        number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        try:
            result[str(name)] = float(number)
        except (TypeError, ValueError):
            raise TypeError(
                f"metric {name!r} is a {type(value).__name__}, not a number; metrics hold "
                "numbers (pass other values as keywords of save())"
            ) from None
    return result


class CheckpointManager:
    """Saves training state into ``directory/step-<n>/`` and restores it exactly.

    Each ``save`` is committed atomically (temporary directory, fsync, manifest with content
    hashes written last, rename); readers never see a partial step. After a commit, retention
    keeps the union of the last ``keep_last`` steps, the ``keep_best`` steps by ``monitor`` and
    every multiple of ``keep_every``; it deletes only step directories of its own.

    Args:
        directory: the checkpoint folder (created if missing).
        keep_last: how many recent steps to keep; None keeps every step.
        keep_best: how many best steps by ``monitor`` to keep as well.
        monitor: the metric ranking steps for ``keep_best`` and ``restore(step="best")``.
        mode: ``"min"`` or ``"max"``: which values of ``monitor`` are better.
        keep_every: keep every step that is a multiple of this, forever.
        async_save: return from ``save`` once tensors are copied to host memory and write in
            the background.
        save_rng: capture the random generators (Python, NumPy, torch CPU and CUDA) with
            every step and restore them on ``restore``.
        distributed: write sharded steps from every rank of a torch.distributed job, with
            ``save``/``restore`` (and this constructor) collective; None: when
            torch.distributed is initialised with more than one rank.
        process_group: the group the checkpoint collectives run on; None makes a gloo group
            of its own (collective: create managers in the same order on every rank).
        state_dict_options: ``StateDictOptions`` passed to ``get_state_dict`` and
            ``set_state_dict`` for the model and optimizer.
        timeout: seconds the checkpoint group waits for a peer before every rank raises
            :class:`~torchkeep.DistributedCheckpointError`.
        per_rank: entries whose state differs per rank (stored once per rank; others are
            stored once and must be equal on every rank).
        cache: what saves leave in the page cache: ``"auto"`` keeps the newest step cached
            while the page cache takes it as fast as direct I/O would (a restore right after
            a save reads memory) and evicts the step before it, ``"keep"`` leaves every step
            cached, ``"drop"`` writes with direct I/O and caches nothing. Every policy is
            equally durable.

    Raises:
        CachePolicyError: ``cache`` names no policy.

    Example:
        >>> with tk.CheckpointManager("ckpt", keep_last=2) as mgr:
        ...     mgr.save(100, model=model, optimizer=opt, metrics={"loss": 0.3}, epoch=1)
        ...     restored = mgr.restore(model=model, optimizer=opt)
        >>> restored.step, restored.extra["epoch"]
        (100, 1)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_best: int = 0,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_every: int | None = None,
        async_save: bool = False,
        save_rng: bool = True,
        distributed: bool | None = None,
        process_group: Any = None,
        state_dict_options: Any = None,
        timeout: float = 600.0,
        per_rank: Sequence[str] = (),
        cache: CachePolicy = "auto",
        storage_options: Mapping[str, Any] | None = None,
        transfer: Transfer | None = None,
    ) -> None:
        self._remote = _remote_steps(directory, storage_options, transfer)
        self.directory: Path | str = Path(directory) if self._remote is None else self._remote.url
        self.cache = check_cache_policy(cache)
        settings = {
            "keep_last": keep_last,
            "keep_best": keep_best,
            "monitor": monitor,
            "mode": mode,
            "keep_every": keep_every,
        }
        self.policy = retention.build(**settings)  # type: ignore[arg-type]
        self._retention_config = retention.config(**settings)  # type: ignore[arg-type]
        self.monitor = monitor
        self.mode = mode
        self.async_save = async_save
        self.save_rng = save_rng
        self._writer = BackgroundWriter()
        self._buffers = SnapshotBuffers()
        self._remover = Remover()
        self._dist_settings = (state_dict_options, tuple(per_rank))
        self._session = _distributed_session(
            self._session_dir,
            distributed,
            process_group,
            timeout,
            self._dist_settings,
            save_rng,
            self._remote,
            self.cache,
        )

    # ----------------------------------------------------------------------------------------
    # what is on disk (or in the bucket)

    @property
    def _dir(self) -> Path:
        """The local checkpoint folder (only for a manager on a local path)."""
        assert isinstance(self.directory, Path), "a local-only path was taken for a URL"
        return self.directory

    @property
    def _session_dir(self) -> Path:
        """The folder a distributed session writes into (unused on object storage, where
        the session writes through ``self._remote``)."""
        return self._dir if self._remote is None else Path()

    def _committed(self) -> list[StepInfo]:
        """The committed steps, oldest first, from the disk or a fresh listing of the bucket."""
        if self._remote is not None:
            return self._remote.committed()
        return _list_committed(self._dir)

    def _stamp(self) -> tuple[int, int] | None:
        """What changes with every commit and retirement (None for buckets: the listings are
        compared instead)."""
        return None if self._remote is not None else _stamp(self._dir)

    def _read(
        self, info: StepInfo, into: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    ) -> LoadedStep:
        """Read and verify a listed step (a bucket's through a private local copy); ``into``
        as for :func:`~torchkeep.checkpoint.reader.read_step`."""
        if self._remote is not None:
            return self._remote.read(info.step, into=into)
        return read_step(info.path, into=into)

    @property
    def steps(self) -> list[int]:
        """Committed steps, oldest first (contents are verified by ``restore``/``verify``)."""
        return [info.step for info in self._committed()]

    @property
    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps
        return steps[-1] if steps else None

    @property
    def best_step(self) -> int | None:
        """The committed step with the best ``monitor`` metric, or None."""
        if self.monitor is None:
            return None
        return retention.best_step(self._committed(), self.monitor, self.mode)

    # ----------------------------------------------------------------------------------------
    # saving

    def save(
        self,
        step: int,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        metrics: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        **extra: Any,
    ) -> Path | str:
        """Save training state as ``step``; committed atomically, then retention runs.

        Everything is validated before the first byte is written. With ``async_save`` this
        returns once the tensors are copied to host memory.

        Args:
            step: the step number (a non-negative int).
            model, optimizer, scheduler, scaler: objects with ``state_dict()`` (or their
                state dicts); restored into the objects passed to :meth:`restore`.
            metrics: numbers stored in the manifest (``monitor`` ranks by one of them).
            overwrite: replace an existing step (atomically) instead of raising.
            **extra: more stateful objects (a sampler, a ``torch.Generator`` such as a
                DataLoader's) or plain values (``epoch=3``).

        Returns:
            The step directory, or its URL on object storage (complete once ``wait()``
            returns, with ``async_save``).

        Raises:
            StepExistsError: ``step`` exists and ``overwrite`` is False.
            UnsupportedValueError: a value cannot be stored without pickle (the message names
                its path).
            StorageFullError: the disk filled up (earlier steps are intact).

        Example:
            >>> mgr.save(500, model=model, optimizer=opt, metrics={"loss": 0.2}, epoch=4)
        """
        slots = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        if self._session is not None:
            return self._save_distributed(step, slots, extra, metrics, overwrite)
        if self._remote is not None:
            self.wait()
            step = _check_step(step)
            return self._save_remote(self._remote, step, slots, extra, metrics, overwrite)
        return self._save_entries(step, slots, extra, metrics=metrics, overwrite=overwrite)

    def _save_distributed(
        self,
        step: int,
        slots: Mapping[str, Any],
        values: Mapping[str, Any],
        metrics: Mapping[str, Any] | None,
        overwrite: bool,
    ) -> Path | str:
        """:meth:`save` on every rank of a distributed job (collective; sharded-v1 step)."""
        from .distributed.session import snapshot

        self.wait()
        step = _check_step(step)
        session = self._session
        assert session is not None
        prepared, error, fields = None, None, {}
        try:
            fields = {"metrics": _clean_metrics(metrics), "retention": self._retention_config}
            prepared = session.prepare(slots, values)
        except Exception as exc:  # raised on every rank by check()
            error = exc
        session.check(step, prepared, error, overwrite=overwrite)
        assert prepared is not None

        def commit() -> None:
            session.write(step, prepared, overwrite=overwrite, fields=fields)
            session.after_commit(lambda: self._apply_retention(step))

        if not self.async_save:
            commit()
        else:
            prepared.tensors = snapshot(prepared.tensors)
            self._writer.submit(commit, label=f"save of checkpoint step {step}")
        if self._remote is not None:
            return self._remote.step_url(step)
        return step_path(self._dir, step)

    def _save_entries(
        self,
        step: int,
        slots: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """:meth:`save` with the entries given as dicts, so any name can be used (``"step"``,
        ``"metrics"``; importers use this); ``slots`` are the ``model=``... arguments.

        Raises:
            UnsupportedValueError: a name is used twice or is not a valid entry name.
        """
        self.wait()
        step = _check_step(step)
        final = step_path(self._dir, step)
        if lookup(final) is not None and not overwrite:  # a path no file can have: typed
            raise StepExistsError(
                f"checkpoint step {step} already exists at {final}; pass overwrite=True to "
                "replace it, or save under another step"
            )
        entries = self._prepare(dict(slots), dict(values))
        fields = {"metrics": _clean_metrics(metrics)}
        self._dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self._dir)
        if not self.async_save:
            self._commit(final, step, entries, overwrite, fields)
            return final
        snapshot = self._buffers.snapshot(entries)
        self._writer.submit(
            lambda: self._commit(final, step, snapshot, overwrite, fields),
            label=f"save of checkpoint step {step}",
        )
        return final

    def _save_remote(
        self,
        remote: RemoteSteps,
        step: int,
        slots: Mapping[str, Any],
        values: Mapping[str, Any],
        metrics: Mapping[str, Any] | None,
        overwrite: bool,
    ) -> str:
        """:meth:`save` to object storage: checked and prepared here, uploaded and committed
        by :class:`~torchkeep.checkpoint.remote.RemoteSteps` (in the background when async)."""
        if overwrite:
            remote.store.replacer()  # a back end that cannot replace conditionally: refuse now
        elif remote.exists(step):
            raise StepExistsError(
                f"checkpoint step {step} already exists at {remote.step_url(step)}; pass "
                "overwrite=True to replace it, or save under another step"
            )
        entries = self._prepare(dict(slots), dict(values))
        fields = {"metrics": _clean_metrics(metrics), "retention": self._retention_config}

        def commit(entries: list[Entry]) -> None:
            remote.commit(step, entries, overwrite=overwrite, manifest_fields=fields)
            self._apply_retention(step)

        if not self.async_save:
            commit(entries)
        else:
            snapshot = self._buffers.snapshot(entries)
            self._writer.submit(lambda: commit(snapshot), label=f"save of checkpoint step {step}")
        return remote.step_url(step)

    def _prepare(self, slots: dict[str, Any], extra: dict[str, Any]) -> list[Entry]:
        taken = sorted(set(extra) & {name for name, value in slots.items() if value is not None})
        if taken:
            raise UnsupportedValueError(
                f"{taken[0]!r} is given both as a state object and as a plain value; rename one"
            )
        entries = [
            prepare(name, value, state_slot=True)
            for name, value in slots.items()
            if value is not None
        ]
        entries += [prepare(name, value) for name, value in extra.items()]
        if self.save_rng:
            entries.append(prepare(RNG_ENTRY, rng.capture(), internal=True))
        return entries

    def _commit(
        self, final: Path, step: int, entries: list[Entry], overwrite: bool, fields: dict[str, Any]
    ) -> None:
        write_step(
            final,
            step,
            entries,
            overwrite=overwrite,
            manifest_fields={**fields, "retention": self._retention_config},
            cache=self.cache,
        )
        self._apply_retention(step)

    def _apply_retention(self, committed: int) -> None:
        """Retire the steps no policy keeps: renamed out of sight now, deleted in the background.

        The step just ``committed`` is always kept: a folder holding newer steps (an earlier
        run's, or planted ones) must not make every save delete itself at once.
        """
        infos = self._committed()
        kept = self.policy.keep(infos) | {committed}
        if self._remote is not None:
            self._remote.retire([info for info in infos if info.step not in kept])
            self._remote.clean_orphans([info for info in infos if info.step in kept])
            return
        retired = [_retire(info) for info in infos if info.step not in kept]
        self._remover.remove([path for path in retired if path is not None])

    def wait(self) -> None:
        """Block until an in-flight async save is committed; raise its error if it failed.

        Also waits for retired steps to be deleted, warning about any that could not be.
        """
        try:
            self._writer.wait()
        finally:
            for problem in self._remover.wait():
                warnings.warn(
                    f"a retired checkpoint step could not be deleted ({problem}); remove it "
                    "by hand to free the space",
                    stacklevel=2,
                )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.wait()
            return
        try:
            self.wait()
        except Exception as save_error:
            warnings.warn(f"the background save also failed: {save_error}", stacklevel=2)

    # ----------------------------------------------------------------------------------------
    # restoring

    def _candidates(self, step: int | Literal["best"] | None) -> tuple[list[StepInfo], bool]:
        """Steps to try in order, and whether falling back past the first is allowed."""
        infos = self._committed()
        if step is None:
            return infos[::-1], True
        if step == "best":
            if self.monitor is None:
                raise ValueError("restore(step='best') needs a manager created with monitor=...")
            ranker = retention.KeepBest(len(infos) or 1, self.monitor, self.mode)
            return ranker.ranked(infos), True
        wanted = _check_step(step)
        matching = [info for info in infos if info.step == wanted]
        if not matching and self._remote is None:
            _raise_if_newer_format(step_path(self._dir, wanted))
        return matching, False

    def _load_first_valid(
        self,
        step: int | Literal["best"] | None,
        into: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> LoadedStep:
        """The first candidate step that reads and verifies whole (``into``: the tensors it
        will be restored into, as for :func:`~torchkeep.checkpoint.reader.read_step`).

        A step retired or replaced by a concurrent writer while it is read is no failure: the
        steps are listed again and the newest candidate is tried (up to ``RACE_ROUNDS`` times).
        A damaged step is skipped with one warning (raised for an explicitly requested step).
        """
        skipped: set[int] = set()
        settled: list[int] | None = None
        for _ in range(RACE_ROUNDS):
            before = self._stamp()
            candidates, fallback = self._candidates(step)
            raced = False
            for info in candidates:
                if info.step in skipped:
                    continue
                try:
                    loaded = self._read(info, into)
                except StepVanishedError:
                    raced = True  # a writer moved on meanwhile: list the steps again
                    break
                except (CorruptFileError, TorchkeepFileNotFoundError) as exc:
                    if not fallback:
                        raise
                    skipped.add(info.step)
                    warnings.warn(
                        f"checkpoint step {info.step} is unusable and was skipped: {exc}",
                        stacklevel=3,
                    )
                else:
                    if step is None and self._remote is None:
                        _warn_damaged_newer(self._dir, loaded.step)
                    return loaded
            # No step worked. Trust that only when the folder did not change meanwhile and two
            # listings in a row agree: a listing taken while a writer commits and retires can
            # miss both the old step and the new one.
            listing = [info.step for info in candidates]
            if not raced and before == self._stamp() and listing == settled:
                what = "valid step" if step is None else f"valid step {step!r}"
                raise CheckpointNotFoundError(
                    f"{self.directory} holds no {what} (committed steps: "
                    f"{self.steps or 'none'}); check the directory, or start training from "
                    "scratch"
                )
            settled = None if raced else listing
        raise CheckpointBusyError(
            f"every step of {self.directory} was retired by a concurrent writer while it was "
            f"being read, {RACE_ROUNDS} times in a row; keep more steps in the writer "
            "(keep_last >= 2) or restore again later"
        )

    def restore(
        self,
        step: int | Literal["best"] | None = None,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        restore_rng: bool = True,
        strict: bool = True,
        allow_world_size_change: bool = False,
        **objects: Any,
    ) -> Restored:
        """Load a step into the given objects, after verifying every file's hash.

        With ``step=None`` (the latest) or ``"best"``, a corrupt step gives a warning naming
        the problem and the next candidate is tried; an explicitly requested step that is
        corrupt raises. Nothing is changed before the step has been fully verified and
        checked against every object passed (keys, shapes and dtypes of a model; parameter
        groups and per-parameter state of an optimizer; the type of a scheduler or scaler; the
        structure of the random generator states). A step retired by a concurrent writer
        while it is read is no error: the newest step is looked for again.

        Args:
            step: None for the latest valid step, ``"best"`` by ``monitor``, or a step number.
            model, optimizer, scheduler, scaler, **objects: objects with
                ``load_state_dict()`` to fill from the entries of the same name; a
                ``torch.Generator`` saved under a name gets its state set in place when
                passed under that name. A wrapped model (``torch.compile``, DataParallel,
                DDP) is filled through the module inside.
            restore_rng: put the random generators back as they were at the save.
            strict: a model must have exactly the saved keys and dtypes; ``False`` restores
                the keys both have and converts dtypes (shapes must always match).
            allow_world_size_change: in a distributed job, restore a step saved by another
                number of ranks even though ``per_rank`` entries passed here cannot be
                restored (they are left as they are).

        Returns:
            A :class:`Restored` with the step, its metrics and the plain values saved with it.

        Raises:
            CheckpointNotFoundError: no (valid) step matches.
            CheckpointBusyError: a concurrent writer retired every step before it was read,
                again and again.
            StateDictMismatchError: an object does not fit its entry (or the step has none);
                raised before any object or generator is changed.

        Example:
            >>> restored = mgr.restore(model=model, optimizer=opt)
            >>> start_epoch = restored.extra["epoch"] + 1
        """
        self.wait()
        targets = {
            name: as_stateful(obj)
            for name, obj in dict(
                model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, **objects
            ).items()
            if obj is not None
        }
        session = self._session or self._sharded_reader(step)
        if session is not None:
            done = session.restore(
                lambda: self._candidates(step),
                targets,
                restore_rng=restore_rng,
                strict=strict,
                allow_world_size_change=allow_world_size_change,
            )
            return Restored(done.step, done.metrics, done.extra, done.path)
        loaded = self._load_first_valid(step, _placement_hint(targets))
        if self._remote is None:
            extra = _apply(loaded, targets, restore_rng=restore_rng, strict=strict)
            return Restored(loaded.step, loaded.metrics, extra, loaded.path)
        url = self._remote.step_url(loaded.step)
        try:
            extra = _apply(loaded, targets, restore_rng=restore_rng, strict=strict)
        except TorchkeepError as exc:  # name the step by its URL, not its private local copy
            raise relabelled(exc, loaded.path, url) from exc
        return Restored(loaded.step, loaded.metrics, extra, url)

    def _sharded_reader(self, step: int | Literal["best"] | None) -> Any:
        """A session without a process group when the step to restore is sharded (a step
        saved by N ranks restored in one process), else None."""
        candidates, _ = self._candidates(step)
        if not candidates or candidates[0].manifest.get("layout") != "sharded-v1":
            return None
        from .distributed.session import DistributedSession

        options, per_rank = self._dist_settings
        return DistributedSession(
            self._session_dir,
            group=None,
            options=options,
            per_rank=per_rank,
            save_rng=self.save_rng,
            remote=self._remote,
        )

    def export_torch(
        self, step: int | Literal["best"] | None, path: str | os.PathLike[str]
    ) -> Path:
        """Write a step as a tutorial-style ``torch.save`` dict for tools that read only that.

        See :func:`torchkeep.checkpoint.migrate.export_torch_checkpoint`.

        Example:
            >>> mgr.export_torch(None, "latest.pt")
        """
        from .migrate import export_torch_checkpoint

        self.wait()
        return export_torch_checkpoint(self._load_first_valid(step), Path(path))


def _apply(
    loaded: LoadedStep, targets: dict[str, Any], *, restore_rng: bool, strict: bool
) -> dict[str, Any]:
    """Check ``loaded`` against every target, then load it into them; return the plain values.

    Nothing is changed before every check has passed.
    """
    _check_targets(loaded, targets)
    targets = {name: _view(obj, loaded.entries[name][1]) for name, obj in targets.items()}
    for name, obj in targets.items():
        precheck.check_target(name, loaded.path, loaded.entries[name][1], obj, strict=strict)
    extra = {
        name: loaded.value(name)
        for name, (kind, _) in loaded.entries.items()
        if kind == "value" and name != RNG_ENTRY
    }
    # Objects whose state cannot be checked go first: if one refuses its state, everything
    # that was checked is still untouched.
    restored: list[str] = []
    for name in sorted(targets, key=lambda n: precheck.checkable(targets[n])):
        _load_into(loaded, name, targets[name], strict=strict, restored=restored)
        restored.append(name)
    if restore_rng and RNG_ENTRY in loaded.entries:
        rng.restore(loaded.value(RNG_ENTRY))
    return extra


def _remote_steps(
    directory: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None,
    transfer: Transfer | None,
) -> RemoteSteps | None:
    """The object-store back end for a URL, None for a local path.

    Raises:
        ValueError: ``storage_options``/``transfer`` with a local path.
        StorageCapabilityError: the back end cannot commit safely.
    """
    if not is_remote(directory):
        if storage_options or transfer is not None:
            raise ValueError(
                f"storage_options and transfer apply to URLs (s3://...), not to the local path "
                f"{directory}"
            )
        return None
    return RemoteSteps(str(directory), storage_options=storage_options, transfer=transfer)


def _distributed_session(
    directory: Path,
    distributed: bool | None,
    process_group: Any,
    timeout: float,
    settings: tuple[Any, tuple[str, ...]],
    save_rng: bool,
    remote: RemoteSteps | None,
    cache: CachePolicy,
) -> Any:
    """The collective half of a distributed manager, or None for a single-process one
    (``remote``: the folder on object storage every rank uploads to and reads from).

    Distributed when ``distributed`` is True, or None and torch.distributed is initialised with
    more than one rank. Makes the manager's own gloo group (collective) unless one is given.
    """
    import torch.distributed as dist

    running = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = running and dist.get_world_size() > 1
    if not distributed:
        return None
    from ..compat import require_sharded_checkpoints

    require_sharded_checkpoints(
        "A distributed CheckpointManager",
        "Upgrade torch, or pass distributed=False and save from one rank only",
    )
    if not running:
        raise ValueError(
            "CheckpointManager(distributed=True) needs torch.distributed initialised first "
            "(torch.distributed.init_process_group)"
        )
    from .distributed.collective import new_group
    from .distributed.session import DistributedSession, entry_names_ok

    options, per_rank = settings
    group = process_group if process_group is not None else new_group(timeout)
    return DistributedSession(
        directory,
        group=group,
        options=options,
        per_rank=entry_names_ok(per_rank),
        save_rng=save_rng,
        remote=remote,
        cache=cache,
    )


def _raise_if_newer_format(path: Path) -> None:
    """Raise FormatVersionError when ``path`` is a step a newer torchkeep wrote: such a step is
    not listed, so a request for it would otherwise only say that there is no such step."""
    try:
        read_step_manifest(path)
    except FormatVersionError:
        raise
    except (CorruptFileError, TorchkeepFileNotFoundError):
        pass


def _placement_hint(targets: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors the models and optimizers among ``targets`` hold before the step is read,
    so that the reader maps only the files that will mostly be copied into them
    (:func:`read_step`'s ``into``). Other objects' state is not asked for twice (it may be
    dear to produce): their files are read into memory of their own."""
    hint = {}
    for name, obj in targets.items():
        if isinstance(obj, (nn.Module, torch.optim.Optimizer)):
            try:
                hint[name] = _current_tensors(obj, name)
            except Exception:  # only a hint: the restore itself reports what is wrong with obj
                hint[name] = {}
    return hint


def _current_tensors(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """The tensors ``obj`` holds now, by flat name: restored in place where they fit."""
    try:
        return tree.flatten(obj.state_dict(), root=name).tensors
    except (TypeError, ValueError):  # a state that cannot be flattened: load into new memory
        return {}


def _load_into(
    loaded: LoadedStep, name: str, obj: Any, *, strict: bool, restored: list[str]
) -> None:
    """Load entry ``name`` into ``obj``; its tensors are copied in place where they fit."""
    module = isinstance(obj, nn.Module)
    options = {"strict": False} if module and not strict else {}
    guard = undo_on_error(obj) if module and has_custom_loading(obj) else contextlib.nullcontext()
    try:
        with guard:  # a module whose own loading code raises gets its tensors back
            obj.load_state_dict(loaded.value(name, into=_current_tensors(obj, name)), **options)
    except Exception as exc:
        done = ", ".join(restored) or "none"
        raise StateDictMismatchError(
            f"cannot restore entry {name!r} of {loaded.path}: {type(obj).__name__}."
            f"load_state_dict refused it ({type(exc).__name__}: {first_line(exc)}); entries "
            f"restored before it: {done}. Pass an object that matches the save, or leave it out "
            f"({name}=None)"
        ) from exc


def _view(obj: Any, stored: Any) -> Any:
    """A module (compiled, DDP-wrapped or plain) as the view whose keys match its stored
    state's wrapper prefixes (see :func:`torchkeep.unwrap.matching_view`); other objects as
    they are."""
    if isinstance(obj, nn.Module) and isinstance(stored, Mapping):
        return matching_view(obj, list(stored))
    return obj


def _stamp(directory: Path) -> tuple[int, int] | None:
    """The identity and modification time of ``directory``: it changes with every commit and
    every retirement of a step in it."""
    try:
        stat = directory.stat()
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    return stat.st_ino, stat.st_mtime_ns


def _list_committed(directory: Path) -> list[StepInfo]:
    """:func:`list_steps`, listed again when a step vanishes under a concurrent writer."""
    for _ in range(RACE_ROUNDS):
        try:
            return list_steps(directory)
        except TorchkeepError:
            raise  # a path no folder can have, a damaged folder: not a race
        except FileNotFoundError:
            continue
    raise CheckpointBusyError(
        f"the steps of {directory} kept disappearing while they were listed; restore again later"
    )


def _check_targets(loaded: LoadedStep, targets: Mapping[str, Any]) -> None:
    """Every object passed to ``restore`` must have a stateful entry; checked before loading."""
    for name, obj in targets.items():
        kind = loaded.entries.get(name, ("missing", None))[0]
        if kind == "stateful" and hasattr(obj, "load_state_dict"):
            continue
        saved = ", ".join(sorted(n for n, (k, _) in loaded.entries.items() if k == "stateful"))
        if kind == "value":
            problem = f"{name!r} was saved as a plain value: read it from restored.extra"
        elif kind == "stateful":
            problem = f"the object passed as {name!r} has no load_state_dict()"
        else:
            problem = f"step {loaded.step} has no {name!r} (stateful entries: {saved or 'none'})"
        raise StateDictMismatchError(f"cannot restore {loaded.path}: {problem}")


def _warn_damaged_newer(directory: Path, step: int) -> None:
    """Warn about step directories newer than ``step`` whose manifest is missing or bad.

    Steps are renamed into place only after their manifest is written, so such a directory is
    a damaged step (or something that is not ours); either way it cannot be restored. The
    check is advisory: a directory a concurrent writer moves meanwhile is left out.
    """
    try:
        suspects = uncommitted_steps(directory)
    except OSError:
        return
    for path in suspects:
        if (parse_step(path.name) or 0) > step:
            try:
                read_step_manifest(path)
                problem = "it is not a readable checkpoint step"
            except (CorruptFileError, TorchkeepFileNotFoundError) as exc:
                problem = str(exc)
            except OSError:
                continue
            if not path.exists():
                continue
            warnings.warn(
                f"checkpoint step directory {path.name} is unusable and was skipped: {problem}",
                stacklevel=4,
            )


def _retire(info: StepInfo) -> Path | None:
    """Rename a step out of sight (atomic); return the hidden name to delete, None if gone."""
    doomed = temp_sibling(info.path)
    try:
        os.rename(info.path, doomed)
    except FileNotFoundError:
        return None
    return doomed
