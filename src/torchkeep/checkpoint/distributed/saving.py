"""The distributed CheckpointManager's collective save (sharded-v1 steps).

Model and optimizer state go through ``get_state_dict`` (sharded: every rank writes its own
chunks); every other entry is replicated (stored once, checked equal on every rank) unless
named in ``per_rank``; the random generators are per rank. Every rank agrees before anything
irreversible happens, so a failure on one rank raises on all of them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.tensor import DTensor

from ... import tree
from ...errors import StepExistsError, UnsupportedValueError
from ...paths import lookup
from ...storage.local import remove_stale_temps
from .. import rng
from ..commit import evict_previous_step
from ..entries import check_name, prepare
from ..layout import RNG_ENTRY, step_path
from . import collective
from .base import SHARDED_SLOTS, SessionBase, optimizers
from .layout import rank_key, tensor_key
from .remote_writer import RemoteStorageWriter
from .writer import TorchkeepStorageWriter


@dataclass
class Prepared:
    """One rank's part of a save: DCP's flat tensors and the JSON documents."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank_state: dict[str, Any] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


def _digest(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of an entry's JSON skeleton and tensor contents (for the replicated check)."""
    hasher = xxhash.xxh3_128(json.dumps(skeleton, sort_keys=True, allow_nan=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        hasher.update(name.encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    return hasher.hexdigest()


class SavingSession(SessionBase):
    """The save half of :class:`~torchkeep.checkpoint.distributed.session.DistributedSession`."""

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
            msd, osd = get_state_dict(model, optimizers(optimizer), options=self.options)
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
        if error is None and self.rank == 0 and not overwrite:
            try:
                where = self._existing(step)
            except Exception as exc:  # the store failed: every rank raises
                error = exc
            else:
                if where is not None:
                    error = StepExistsError(
                        f"checkpoint step {step} already exists at {where}; pass overwrite=True "
                        "to replace it, or save under another step"
                    )
        collective.agree(error, self.group, f"the save of checkpoint step {step}")
        assert prepared is not None
        if collective.all_equal(prepared.digests, self.group):
            return
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

    def _existing(self, step: int) -> str | None:
        """Where ``step`` is committed now, None when it is not."""
        if self.remote is not None:
            return self.remote.step_url(step) if self.remote.exists(step) else None
        final = step_path(self.directory, step)
        return str(final) if lookup(final) is not None else None

    def write(
        self,
        step: int,
        prepared: Prepared,
        *,
        overwrite: bool,
        fields: Mapping[str, Any],
        path: Path | None = None,
    ) -> Path:
        """Write and commit ``step`` on every rank (collective); the coordinator commits.

        ``path`` names the step directory when a framework chooses it (``last.ckpt``);
        by default it is ``step-<n>`` in the session's directory.
        """
        final = step_path(self.directory, step) if path is None else path
        writer: TorchkeepStorageWriter
        transfers: Any = contextlib.nullcontext()
        if self.remote is not None:
            writer = RemoteStorageWriter(
                self.remote,
                step,
                state={"entries": prepared.entries},
                rank_state=prepared.rank_state,
                overwrite=overwrite,
                manifest_fields=fields,
            )
            transfers = self.remote.store.deadline()  # one deadline for this rank's save
        else:
            if self.rank == 0:
                final.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(final.parent)
            writer = TorchkeepStorageWriter(
                final,
                state={"entries": prepared.entries},
                rank_state=prepared.rank_state,
                step=step,
                overwrite=overwrite,
                manifest_fields=fields,
                cache=self.cache,
            )
        where = self.remote.step_url(step) if self.remote is not None else final
        try:
            with transfers, collective.single_process_quiet(self.group):
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
                exc, f"the save of checkpoint step {step} to {where}", me=self.rank
            ) from None
        if self.cache == "auto":  # as for single-process steps: only the newest stays cached
            evict_previous_step(final, step)
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
