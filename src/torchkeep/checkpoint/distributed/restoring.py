"""The distributed CheckpointManager's collective restore (sharded-v1 steps).

Rank 0 lists the candidate steps and every rank tries them in that order; each step is
checked against the live objects and every chunk verified on every rank before a byte reaches
a live tensor, so a damaged step makes every rank fall back together. The ranks agree once
per step, after every check (:func:`.collective.failures`: one flag when all passed), instead
of through ``dcp.load``'s collectives. A single-process step among the candidates is restored
by :mod:`.single` under the same rules.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ... import tree
from ...errors import (
    CorruptFileError,
    DistributedCheckpointError,
    FileFormatError,
    StateDictMismatchError,
    TorchkeepError,
    TorchkeepFileNotFoundError,
    first_line,
)
from .. import precheck, rng
from ..layout import RNG_ENTRY, STATE_NAME, StepInfo
from ..reader import read_step
from ..remote import relabelled
from . import collective, single
from .base import SHARDED_SLOTS, SessionBase, optimizers
from .layout import LAYOUT, rank_key, tensor_key
from .reader import _DTYPES, read_index
from .remote_source import shard_opener
from .verified_load import VerifiedLoad

_DAMAGE = (FileFormatError, TorchkeepFileNotFoundError)  # a step to skip, not a mistake


@dataclass
class _Verified:
    """A step every rank has checked and verified; only its fresh tensors are filled yet."""

    manifest: dict[str, Any]
    state: dict[str, Any]
    templates: dict[str, torch.Tensor]
    values: dict[str, Any]
    load: VerifiedLoad


@dataclass
class RestoredState:
    """What a distributed restore loaded."""

    step: int
    path: Path | str
    metrics: dict[str, Any]
    extra: dict[str, Any]


class RestoringSession(SessionBase):
    """The restore half of :class:`~torchkeep.checkpoint.distributed.session.DistributedSession`."""

    def restore(
        self,
        candidates: Callable[[], tuple[list[StepInfo], bool]],
        targets: Mapping[str, Any],
        *,
        restore_rng: bool,
        strict: bool,
        allow_world_size_change: bool,
    ) -> RestoredState:
        """Restore the first candidate step that verifies, on every rank alike (collective).

        ``candidates`` runs on rank 0 only; its list is broadcast so that ranks never disagree
        on which step is "latest".
        """
        listing = None
        if self.rank == 0:
            infos, fallback = candidates()
            listing = (
                [(i.step, str(i.path), i.manifest.get("layout") == LAYOUT) for i in infos],
                fallback,
            )
        steps, fallback = collective.broadcast(listing, self.group)
        for step, path, sharded in steps:
            path = Path(path)
            if not sharded:
                done = self._try_single(
                    step, path, targets, strict=strict, fallback=fallback,
                    allow=allow_world_size_change, restore_rng=restore_rng,
                )  # fmt: skip
                if done is None:
                    continue
                return done
            verified = self._try(
                path, targets, strict=strict, fallback=fallback, allow=allow_world_size_change,
                step=step,
            )  # fmt: skip
            if verified is None:
                continue
            done = self._finish(path, verified, targets, restore_rng=restore_rng)
            if self.remote is not None:
                done.path = self.remote.step_url(step)
            return done
        from ...errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(
            f"{self.location} holds no valid step to restore (tried "
            f"{[s for s, _, _ in steps] or 'none'}); "
            "check the directory, or start training from scratch"
        )

    def restore_at(
        self, path: Path, targets: Mapping[str, Any], *, restore_rng: bool, strict: bool
    ) -> RestoredState:
        """Restore the step at ``path`` (a directory a framework named; collective, no
        fallback): every rank verifies its chunks before anything changes, or all raise."""
        verified = self._try(path, targets, strict=strict, fallback=False, allow=False)
        assert verified is not None  # without fallback a bad step raises
        return self._finish(path, verified, targets, restore_rng=restore_rng)

    def _try(
        self,
        path: Path,
        targets: Mapping[str, Any],
        *,
        strict: bool,
        fallback: bool,
        allow: bool,
        step: int | None = None,
    ) -> _Verified | None:
        """Read, check and verify one step on every rank; None to try the next one.

        On object storage (``step`` names it) the step's documents are copied into a private
        folder first and every rank reads its chunks from the shard objects by ranges.
        """
        with contextlib.ExitStack() as stack:
            if self.remote is None:
                return self._try_at(path, None, targets, strict, fallback, allow)
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="torchkeep-")))
            stack.enter_context(self.remote.store.deadline())  # one for this rank's reads
            assert step is not None
            unreadable: BaseException | None = None
            try:
                path = self.remote.fetch(step, scratch, only=(STATE_NAME,))
            except Exception as exc:  # damaged or retired meanwhile, or the store failed
                unreadable = exc
            url = self.remote.step_url(step)
            try:
                return self._try_at(path, step, targets, strict, fallback, allow, unreadable)
            except DistributedCheckpointError:
                raise  # its per-rank causes stay attached
            except TorchkeepError as exc:  # name the step by its URL, not the private copy
                raise relabelled(exc, path, url) from exc

    def _try_at(
        self,
        path: Path,
        step: int | None,
        targets: Mapping[str, Any],
        strict: bool,
        fallback: bool,
        allow: bool,
        unreadable: BaseException | None = None,
    ) -> _Verified | None:
        """:meth:`_try` on the step's documents at ``path`` (``unreadable``: why they could
        not be fetched).

        Every rank reads the index, checks it against its objects, stages and hashes its
        chunks, fills its fresh tensors from them and checks the random generator states;
        then the ranks agree once. Only a step that passed on every rank is returned, with
        nothing live changed yet.
        """
        error: BaseException | None = unreadable
        verified: _Verified | None = None
        try:
            if unreadable is not None:
                raise unreadable
            manifest, state = read_index(path)
            opener = None
            if self.remote is not None and step is not None:
                opener = shard_opener(self.remote, step, manifest)
            templates, values, fresh = self._templates(
                path, manifest, state, targets, strict=strict, allow_world_size_change=allow
            )
            load = VerifiedLoad(path, manifest, state, templates, opener=opener)
            verified = _Verified(manifest, state, templates, values, load)
            load.copy(fresh)  # memory of its own: nothing live changes
            if RNG_ENTRY in values:
                rng.check(values[RNG_ENTRY], source=f"{path} ({RNG_ENTRY})")
        except Exception as exc:
            error = exc
        passed = False
        try:
            passed = self._settled(path, error, fallback=fallback, stacklevel=6)
        finally:
            if verified is not None and not passed:  # this rank's staged chunks, unused
                verified.load.close()
        return verified if passed else None

    def _settled(
        self, path: Path, error: BaseException | None, *, fallback: bool, stacklevel: int
    ) -> bool:
        """Whether every rank passed (collective): False when the step is damaged on some
        rank and ``fallback`` allows trying the next step (every rank warns alike); else a
        failure raises on every rank, nothing changed.

        A damaged step raises its own kind of error everywhere (``ChecksumMismatchError``...);
        any other failure raises on its rank and as ``DistributedCheckpointError`` elsewhere.
        """
        failed = collective.failures(error, self.group, f"the restore of {path}")
        if not failed:
            return True
        first = failed[min(failed)]
        if all(isinstance(e, _DAMAGE) for e in failed.values()):
            if fallback:
                warnings.warn(
                    f"checkpoint step {path.name} is unusable and was skipped (nothing was "
                    f"loaded from it): {first_line(first)}",
                    stacklevel=stacklevel,
                )
                return False
            raise error if error is not None else type(first)(str(first))
        if error is not None:
            raise error
        raise DistributedCheckpointError(
            f"the restore of {path} failed on {collective.summary(failed)} before anything was "
            "changed; fix the cause on that rank and call it again on every rank",
            failed,
        )

    def _try_single(
        self,
        step: int,
        path: Path,
        targets: Mapping[str, Any],
        *,
        strict: bool,
        fallback: bool,
        allow: bool,
        restore_rng: bool,
    ) -> RestoredState | None:
        """Restore a single-process step (:mod:`.single`): every rank reads and verifies it
        whole and checks it against its objects before any rank loads; None to try the next
        step (it is damaged on some rank and ``fallback`` allows)."""
        error: BaseException | None = None
        loaded = checked = None
        try:
            loaded = read_step(path) if self.remote is None else self.remote.read(step)
            checked = single.plan(
                self, loaded, targets, strict=strict, allow_world_size_change=allow
            )
        except Exception as exc:
            error = exc
        if not self._settled(path, error, fallback=fallback, stacklevel=5):
            return None
        assert checked is not None  # every rank passed
        assert loaded is not None
        extra = single.apply(self, checked, targets, strict=strict, restore_rng=restore_rng)
        where = path if self.remote is None else self.remote.step_url(step)
        return RestoredState(loaded.step, where, loaded.metrics, extra)

    def _templates(
        self,
        path: Path,
        manifest: Mapping[str, Any],
        state: Mapping[str, Any],
        targets: Mapping[str, Any],
        *,
        strict: bool,
        allow_world_size_change: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], set[str]]:
        """The tensors to load into (live sharded state, fresh memory for the rest), checked
        against the step's index first; the replicated entries' values built on them; and
        the keys of the fresh ones."""
        index = state["tensors"]
        entries = state["entries"]
        templates: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        fresh: set[str] = set()
        for name in targets:
            if name not in entries or entries[name]["kind"] != "stateful":
                saved = sorted(n for n, e in entries.items() if e["kind"] == "stateful")
                raise StateDictMismatchError(
                    f"cannot restore {path}: step has no stateful {name!r} (stateful entries: "
                    f"{', '.join(saved) or 'none'})"
                )
        model = targets.get("model")
        if model is not None:
            msd, osd = get_state_dict(
                model, optimizers(targets.get("optimizer")), options=self.options
            )
            sharded: dict[str, Any] = {"model": msd}
            if targets.get("optimizer") is not None:
                sharded["optimizer"] = osd
            for name, live_state in sharded.items():
                for flat_name, tensor in tree.flatten(live_state, root=name).tensors.items():
                    key = tensor_key(name, flat_name)
                    _check_fit(path, name, key, tensor, index.get(key))
                    templates[key] = tensor
                stored = {k for k in index if k.startswith(f"{name}/")}
                missing = sorted(stored - set(templates))
                if missing and strict and name == "model":
                    raise StateDictMismatchError(
                        f"cannot restore entry 'model' of {path}: nothing was changed; the step "
                        f"holds {len(missing)} tensor(s) the model lacks, e.g. "
                        f"{missing[0].split('/', 1)[1]!r}. Pass the model the step was saved "
                        "from, or strict=False"
                    )
        elif targets.get("optimizer") is not None:
            raise StateDictMismatchError(
                "restoring optimizer= in a distributed step needs model= too"
            )
        same_world = state["world_size"] == self.world_size
        per_rank = sorted(n for n in targets if entries[n]["scope"] == "per_rank")
        if per_rank and not same_world and not allow_world_size_change:
            raise StateDictMismatchError(
                f"cannot restore {path}: nothing was changed; entries {per_rank} were saved per "
                f"rank by {state['world_size']} ranks and this job has {self.world_size}. Pass "
                "allow_world_size_change=True to leave them as they are"
            )
        for name, entry in entries.items():
            if entry["scope"] == "sharded":
                if name not in SHARDED_SLOTS and name in targets:
                    live = tree.flatten(targets[name].state_dict(), root=name).tensors
                    tensors: dict[str, torch.Tensor] = {}
                    for flat_name, tensor in live.items():
                        key = tensor_key(name, flat_name)
                        _check_fit(path, name, key, tensor, index.get(key))
                        tensors[flat_name] = templates[key] = tensor
                    values[name] = tree.unflatten(
                        entry["value"], tensors, source=f"{path} (entry {name!r})"
                    )
                continue
            if entry["scope"] == "per_rank":
                if not same_world:
                    continue
                skeleton = state["ranks"][self.rank].get(name)
                prefix = rank_key(self.rank, name, "")
            else:
                skeleton = entry["value"]
                prefix = tensor_key(name, "")
            tensors = {}
            for key, described in index.items():
                if key.startswith(prefix):
                    tensors[key[len(prefix) :]] = templates[key] = _empty(described, path, key)
                    fresh.add(key)
            value = tree.unflatten(skeleton, tensors, source=f"{path} (entry {name!r})")
            if name in targets:
                precheck.check_target(name, path, value, targets[name], strict=strict)
            values[name] = value
        return templates, values, fresh

    def _finish(
        self,
        path: Path,
        verified: _Verified,
        targets: Mapping[str, Any],
        *,
        restore_rng: bool,
    ) -> RestoredState:
        """Copy a step every rank verified into the live objects (collective: every rank
        raises if one failed on the way)."""
        error: BaseException | None = None
        try:
            try:
                verified.load.copy()
            finally:
                verified.load.close()
            done = self._apply(path, verified, targets, restore_rng=restore_rng)
        except Exception as exc:
            error = exc
        failed = collective.failures(error, self.group, f"the restore of {path}")
        if error is not None:
            raise error
        if failed:
            raise DistributedCheckpointError(
                f"the restore of {path} failed on {collective.summary(failed)} after every rank "
                "had verified it; this rank loaded it, so restore again on every rank",
                failed,
            )
        return done

    def _apply(
        self,
        path: Path,
        verified: _Verified,
        targets: Mapping[str, Any],
        *,
        restore_rng: bool,
    ) -> RestoredState:
        """Load ``verified`` (its chunks copied) into the live objects on this rank."""
        state, templates, values = verified.state, verified.templates, verified.values
        entries = state["entries"]
        saved_world = state["world_size"]
        model = targets.get("model")
        if model is not None:
            sharded: dict[str, Any] = {}
            for name in SHARDED_SLOTS:
                if targets.get(name) is None:
                    continue
                prefix = tensor_key(name, "")
                tensors = {
                    k[len(prefix) :]: t for k, t in templates.items() if k.startswith(prefix)
                }
                sharded[name] = tree.unflatten(
                    entries[name]["value"], tensors, source=f"{path} (entry {name!r})"
                )
            set_state_dict(
                model,
                optimizers(targets.get("optimizer")),
                model_state_dict=sharded["model"],
                optim_state_dict=sharded.get("optimizer", {}),
                options=self.options,
            )
        for name, obj in targets.items():
            if name in SHARDED_SLOTS or name not in values:
                continue
            obj.load_state_dict(values[name])
        if restore_rng and RNG_ENTRY in entries:
            if RNG_ENTRY in values:
                rng.restore(values[RNG_ENTRY])
            else:
                warnings.warn(
                    f"resumed on {self.world_size} rank(s) from a step saved by {saved_world}: "
                    "the random generator states were not restored (they are per rank)",
                    stacklevel=4,
                )
        extra = {
            name: values[name]
            for name, entry in entries.items()
            if entry["kind"] == "value" and name != RNG_ENTRY and name in values
        }
        return RestoredState(state["step"], path, dict(verified.manifest.get("metrics", {})), extra)


def _empty(described: Mapping[str, Any], path: Path, key: str) -> torch.Tensor:

    dtype = _DTYPES.get(described["dtype"])
    if dtype is None:
        raise CorruptFileError(f"{path}: tensor {key!r} has unknown dtype {described['dtype']!r}")
    return torch.empty(described["shape"], dtype=dtype)


def _check_fit(path: Path, entry: str, key: str, live: torch.Tensor, stored: Any) -> None:
    """Raise unless the live tensor ``key`` has the global shape and dtype the step holds."""
    name = key.split("/", 1)[1]
    if stored is None:
        raise StateDictMismatchError(
            f"cannot restore entry {entry!r} of {path}: nothing was changed; the step has no "
            f"{name!r}. Pass the objects the step was saved from"
        )
    if (
        list(live.shape) != stored["shape"]
        or str(live.dtype).removeprefix("torch.") != stored["dtype"]
    ):
        raise StateDictMismatchError(
            f"cannot restore entry {entry!r} of {path}: nothing was changed; {name!r} is "
            f"{stored['dtype']} {stored['shape']} in the step but {live.dtype} "
            f"{list(live.shape)} here. Pass the objects the step was saved from"
        )
