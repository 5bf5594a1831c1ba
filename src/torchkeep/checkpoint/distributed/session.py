"""The distributed CheckpointManager's collective save and restore (sharded-v1 steps).

Model and optimizer state go through ``get_state_dict``/``set_state_dict`` (sharded: every rank
writes its own chunks); every other entry is replicated (stored once, checked equal on every
rank) unless named in ``per_rank``; the random generators are per rank. Every step of a save
or restore is agreed between the ranks before anything irreversible happens, so a failure on
one rank raises on all of them instead of leaving the others waiting.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.tensor import DTensor

from ... import tree
from ...errors import (
    CorruptFileError,
    FileFormatError,
    StateDictMismatchError,
    StepExistsError,
    TorchkeepFileNotFoundError,
    UnsupportedValueError,
    first_line,
)
from ...paths import lookup
from ...storage.local import remove_stale_temps
from .. import precheck, rng
from ..entries import check_name, prepare
from ..layout import RNG_ENTRY, StepInfo, step_path
from . import collective
from .layout import rank_key, tensor_key
from .reader import NoPickleLoadPlanner, TorchkeepStorageReader, read_index
from .writer import TorchkeepStorageWriter

SHARDED_SLOTS = ("model", "optimizer")


@dataclass
class Prepared:
    """One rank's part of a save: DCP's flat tensors and the JSON documents."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank_state: dict[str, Any] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


@dataclass
class RestoredState:
    """What a distributed restore loaded."""

    step: int
    path: Path
    metrics: dict[str, Any]
    extra: dict[str, Any]


def _optimizers(optimizer: Any) -> list[Any]:
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


def _digest(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of an entry's JSON skeleton and tensor contents (for the replicated check)."""
    hasher = xxhash.xxh3_128(json.dumps(skeleton, sort_keys=True, allow_nan=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        hasher.update(name.encode())
        hasher.update(tensor.view(torch.uint8).reshape(-1).numpy().tobytes())
    return hasher.hexdigest()


class DistributedSession:
    """The collective half of a distributed :class:`~torchkeep.CheckpointManager`.

    Args:
        directory: the checkpoint folder (shared by every rank).
        group: the checkpoint process group, or None for one process without a group.
        options: ``StateDictOptions`` for ``get_state_dict``/``set_state_dict``.
        per_rank: names of entries whose state differs per rank.
        save_rng: store every rank's random generator states.
    """

    def __init__(
        self,
        directory: Path,
        *,
        group: Any,
        options: StateDictOptions | None,
        per_rank: Sequence[str],
        save_rng: bool,
    ) -> None:
        self.directory = directory
        self.group = group
        self.options = options
        self.per_rank = frozenset(per_rank)
        self.save_rng = save_rng
        self.rank = collective.rank(group)
        self.world_size = collective.world_size(group)

    # ----------------------------------------------------------------------------------------
    # saving

    def prepare(self, slots: Mapping[str, Any], values: Mapping[str, Any]) -> Prepared:
        """Split this rank's state into DCP's flat tensors and JSON (validating everything)."""
        out = Prepared()
        model, optimizer = slots.get("model"), slots.get("optimizer")
        if optimizer is not None and model is None:
            raise UnsupportedValueError(
                "a distributed save of optimizer= needs model= too (get_state_dict maps the "
                "optimizer's state to the model's parameter names)"
            )
        if model is not None:
            msd, osd = get_state_dict(model, _optimizers(optimizer), options=self.options)
            self._add_sharded(out, "model", msd)
            if optimizer is not None:
                self._add_sharded(out, "optimizer", osd)
        others = {k: v for k, v in slots.items() if k not in SHARDED_SLOTS and v is not None}
        taken = sorted(set(others) & set(values))
        if taken:
            raise UnsupportedValueError(
                f"{taken[0]!r} is given both as a state object and as a plain value; rename one"
            )
        for name, value in [*others.items(), *values.items()]:
            state = value.state_dict() if hasattr(value, "state_dict") else value
            if name not in self.per_rank and _holds_dtensor(state):
                check_name(name)
                kind = "stateful" if hasattr(value, "load_state_dict") else "value"
                self._add_sharded(out, name, state, kind=kind)
                continue
            scope = "per_rank" if name in self.per_rank else "replicated"
            self._add_entry(out, prepare(name, value, state_slot=name in others), scope)
        if self.save_rng:
            self._add_entry(out, prepare(RNG_ENTRY, rng.capture(), internal=True), "per_rank")
        return out

    def _add_sharded(self, out: Prepared, name: str, state: Any, *, kind: str = "stateful") -> None:
        flat = tree.flatten(state, root=name)
        for flat_name, tensor in flat.tensors.items():
            if not isinstance(tensor, DTensor) and tensor.dtype not in _STORABLE:
                raise UnsupportedValueError(
                    f"cannot save {name!r}: {flat_name} has dtype {tensor.dtype}"
                )
            out.tensors[tensor_key(name, flat_name)] = tensor
        out.entries[name] = {"kind": kind, "scope": "sharded", "value": flat.skeleton}

    def _add_entry(self, out: Prepared, entry: Any, scope: str) -> None:
        tensors = {**entry.tensors, **{a: entry.tensors[c] for a, c in entry.aliases.items()}}
        for flat_name, tensor in tensors.items():
            key = (
                rank_key(self.rank, entry.name, flat_name)
                if scope == "per_rank"
                else tensor_key(entry.name, flat_name)
            )
            out.tensors[key] = tensor
        if scope == "per_rank":
            out.entries[entry.name] = {"kind": entry.kind, "scope": scope, "value": None}
            out.rank_state[entry.name] = entry.skeleton
        else:
            out.entries[entry.name] = {"kind": entry.kind, "scope": scope, "value": entry.skeleton}
            out.digests[entry.name] = _digest(entry.skeleton, tensors)

    def check(
        self, step: int, prepared: Prepared | None, error: BaseException | None, *, overwrite: bool
    ) -> None:
        """Agree that every rank is ready to write ``step`` (collective): raise on every rank
        if one failed to prepare, if the step exists (without ``overwrite``) or if a
        replicated entry differs between ranks."""
        final = step_path(self.directory, step)
        if error is None and self.rank == 0 and not overwrite and lookup(final) is not None:
            error = StepExistsError(
                f"checkpoint step {step} already exists at {final}; pass overwrite=True to "
                "replace it, or save under another step"
            )
        collective.agree(error, self.group, f"the save of checkpoint step {step}")
        assert prepared is not None
        digests = collective.all_gather(prepared.digests, self.group)
        for name, digest in digests[0].items():
            differ = [r for r, d in enumerate(digests) if d.get(name) != digest]
            if differ:
                raise UnsupportedValueError(
                    f"cannot save checkpoint step {step}: entry {name!r} differs between rank 0 "
                    f"and rank(s) {differ}, but it is stored once for all ranks. Make it equal "
                    f"on every rank, or pass per_rank=[{name!r}] to the CheckpointManager to "
                    "store one copy per rank"
                )

    def write(
        self, step: int, prepared: Prepared, *, overwrite: bool, fields: Mapping[str, Any]
    ) -> Path:
        """Write and commit ``step`` on every rank (collective); the coordinator commits."""
        final = step_path(self.directory, step)
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.directory)
        writer = TorchkeepStorageWriter(
            final,
            state={"entries": prepared.entries},
            rank_state=prepared.rank_state,
            step=step,
            overwrite=overwrite,
            manifest_fields=fields,
        )
        try:
            with collective.single_process_quiet(self.group):
                dcp_save(
                    prepared.tensors,
                    storage_writer=writer,
                    process_group=self.group,
                    no_dist=self.group is None,
                )
        except (Exception, CheckpointException) as exc:
            writer.abort()
            if collective.only_cause(exc, StepExistsError):
                raise StepExistsError(str(collective.causes(exc)[0])) from None
            raise collective.translate(
                exc, f"the save of checkpoint step {step} to {final}", me=self.rank
            ) from None
        return final

    def after_commit(self, retention: Callable[[], None]) -> None:
        """Run ``retention`` on rank 0 only, then let every rank return (collective): every
        rank's ``save()`` returns with the same steps on disk."""
        error: BaseException | None = None
        if self.rank == 0:
            try:
                retention()
            except Exception as exc:
                error = exc
        collective.agree(error, self.group, "retention after the commit")

    # ----------------------------------------------------------------------------------------
    # restoring

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
            listing = ([(info.step, str(info.path)) for info in infos], fallback)
        steps, fallback = collective.broadcast(listing, self.group)
        for _step, path in steps:
            path = Path(path)
            loaded = self._try(
                path, targets, strict=strict, fallback=fallback, allow=allow_world_size_change
            )
            if loaded is None:
                continue
            manifest, state, templates, values = loaded
            return self._apply(
                path, manifest, state, templates, values, targets,
                restore_rng=restore_rng,
            )  # fmt: skip
        from ...errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(
            f"{self.directory} holds no valid step to restore (tried "
            f"{[s for s, _ in steps] or 'none'}); "
            "check the directory, or start training from scratch"
        )

    def _try(
        self,
        path: Path,
        targets: Mapping[str, Any],
        *,
        strict: bool,
        fallback: bool,
        allow: bool,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None:
        """Read, check and load one step into fresh templates; None to try the next one."""
        error: BaseException | None = None
        try:
            manifest, state = read_index(path)
        except (FileFormatError, TorchkeepFileNotFoundError) as exc:
            error = exc
        # an intact step of another layout (single-process) is no damage: never skipped
        fatal = isinstance(error, FileFormatError) and not isinstance(error, CorruptFileError)
        report = None if error is None else (first_line(error), fatal)
        reports = collective.all_gather(report, self.group)
        bad = [(r, text) for r, text in enumerate(reports) if text is not None]
        if any(text[1] for _r, text in bad):
            if error is not None:
                raise error
            raise FileFormatError(next(text[0] for _r, text in bad if text[1]))
        if bad:
            if not fallback:
                if error is not None:
                    raise error
                raise CorruptFileError(f"checkpoint step {path} is unusable: {bad[0][1][0]}")
            warnings.warn(
                f"checkpoint step {path.name} is unusable and was skipped: {bad[0][1][0]}",
                stacklevel=4,
            )
            return None
        error = None
        templates: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        try:
            templates, values = self._templates(
                path, manifest, state, targets, strict=strict, allow_world_size_change=allow
            )
        except Exception as exc:  # a mismatch on any rank: every rank raises, nothing changed
            error = exc
        collective.agree(error, self.group, f"the restore of {path}")
        try:
            with collective.single_process_quiet(self.group):
                dcp_load(
                    templates,
                    storage_reader=TorchkeepStorageReader(path),
                    planner=NoPickleLoadPlanner(),
                    process_group=self.group,
                    no_dist=self.group is None,
                )
        except (Exception, CheckpointException) as exc:
            if fallback and collective.only_cause(exc, CorruptFileError):
                cause = next(iter(collective.causes(exc).values()))
                warnings.warn(
                    f"checkpoint step {path.name} is unusable and was skipped (nothing was "
                    f"loaded from it): {first_line(cause)}",
                    stacklevel=4,
                )
                return None
            if collective.only_cause(exc, CorruptFileError):
                cause = next(iter(collective.causes(exc).values()))
                raise type(cause)(str(cause)) from None
            raise collective.translate(exc, f"the restore of {path}", me=self.rank) from None
        error = None
        if RNG_ENTRY in values:  # its tensors are loaded now (verified by their hashes)
            try:
                rng.check(values[RNG_ENTRY], source=f"{path} ({RNG_ENTRY})")
            except CorruptFileError as exc:
                error = exc
        collective.agree(error, self.group, f"the restore of {path}")
        return manifest, state, templates, values

    def _templates(
        self,
        path: Path,
        manifest: Mapping[str, Any],
        state: Mapping[str, Any],
        targets: Mapping[str, Any],
        *,
        strict: bool,
        allow_world_size_change: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors DCP loads into (live sharded state, fresh memory for the rest), checked
        against the step's index first; and the replicated entries' values built on them."""
        index = state["tensors"]
        entries = state["entries"]
        templates: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
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
                model, _optimizers(targets.get("optimizer")), options=self.options
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
                    tensors[key[len(prefix) :]] = templates.setdefault(
                        key, _empty(described, path, key)
                    )
            value = tree.unflatten(skeleton, tensors, source=f"{path} (entry {name!r})")
            if name in targets:
                precheck.check_target(name, path, value, targets[name], strict=strict)
            values[name] = value
        return templates, values

    def _apply(
        self,
        path: Path,
        manifest: Mapping[str, Any],
        state: Mapping[str, Any],
        templates: Mapping[str, torch.Tensor],
        values: Mapping[str, Any],
        targets: Mapping[str, Any],
        *,
        restore_rng: bool,
    ) -> RestoredState:
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
                _optimizers(targets.get("optimizer")),
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
        return RestoredState(state["step"], path, dict(manifest.get("metrics", {})), extra)


_STORABLE = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
}  # fmt: skip


def _holds_dtensor(state: Any) -> bool:
    """True when ``state`` holds a DTensor (the entry is then stored sharded)."""
    try:
        return any(isinstance(t, DTensor) for t in tree.flatten(state).tensors.values())
    except (TypeError, ValueError):  # not storable: prepare() names the problem
        return False


def _empty(described: Mapping[str, Any], path: Path, key: str) -> torch.Tensor:
    from .reader import _DTYPES

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


def entry_names_ok(names: Sequence[str]) -> list[str]:
    """Validate ``per_rank`` names as entry names."""
    return [check_name(n) for n in names]


def snapshot(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``tensors`` for a background save: training may change the originals at once.

    A DTensor's local shard is copied and wrapped again with its mesh, placements and global
    shape, so DCP still plans with the global layout.
    """
    copies: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        with torch.no_grad():
            if isinstance(tensor, DTensor):
                local = tensor.to_local().detach().to("cpu", copy=True)
                copies[key] = DTensor.from_local(
                    local,
                    tensor.device_mesh,
                    tensor.placements,
                    shape=tensor.shape,
                    stride=tensor.stride(),
                    run_check=False,
                )
            else:
                copies[key] = tensor.detach().to("cpu", copy=True)
    return copies
