"""A distributed restore of a single-process step (one saved without torch.distributed).

Every rank reads and verifies the whole step (full tensors, every file hashed), checks it
against its own live objects, and only when every rank has passed both does any rank load:
the model and optimizer through ``set_state_dict(..., options=StateDictOptions(
full_state_dict=True))``, which keeps each rank's part of every tensor (its FSDP2 or
tensor-parallel shard, or the whole tensor under DDP). A single-process optimizer state is
keyed by parameter index; it is re-keyed by parameter name in the live optimizer's order (the
names ``get_state_dict`` lists in each parameter group), the form ``set_state_dict`` takes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from ... import tree
from ...errors import StateDictMismatchError
from .. import precheck, rng
from ..layout import RNG_ENTRY
from ..reader import LoadedStep
from .base import SHARDED_SLOTS, SessionBase, optimizers


@dataclass
class SinglePlan:
    """What a checked single-process step loads into which live object."""

    loaded: LoadedStep
    model: dict[str, Any] | None
    optimizer: dict[str, Any] | None
    others: dict[str, Any]
    """Entry name -> state for every other live object passed (per-rank ones left out)."""


def plan(
    session: SessionBase,
    loaded: LoadedStep,
    targets: Mapping[str, Any],
    *,
    strict: bool,
    allow_world_size_change: bool,
) -> SinglePlan:
    """Check ``loaded`` against the live ``targets`` on this rank; change nothing.

    Raises:
        StateDictMismatchError: an object does not fit its entry, the step lacks one, or a
            ``per_rank`` entry would be restored on another world size (saved by 1 process).
    """
    path = loaded.path
    entries = loaded.entries
    for name in targets:
        if name not in entries or entries[name][0] != "stateful":
            saved = sorted(n for n, (kind, _) in entries.items() if kind == "stateful")
            raise StateDictMismatchError(
                f"cannot restore {path}: step has no stateful {name!r} (stateful entries: "
                f"{', '.join(saved) or 'none'})"
            )
    model, opts = targets.get("model"), optimizers(targets.get("optimizer"))
    if opts and model is None:
        raise StateDictMismatchError("restoring optimizer= in a distributed step needs model= too")
    if len(opts) > 1:
        raise StateDictMismatchError(
            f"cannot restore {path}: a single-process step holds one optimizer, {len(opts)} "
            "were passed; pass the one it was saved from"
        )
    model_state = optim_state = None
    if model is not None:
        live_model, live_optim = get_state_dict(model, opts, options=StateDictOptions())
        model_state = loaded.value("model")
        _check_model(path, model_state, live_model, strict=strict)
        if opts:
            saved_optim = entries["optimizer"][1]
            precheck.check_target("optimizer", path, saved_optim, opts[0], strict=strict)
            optim_state = _by_name(loaded.value("optimizer"), live_optim)
    per_rank = sorted(n for n in targets if n in session.per_rank)
    if per_rank and session.world_size != 1 and not allow_world_size_change:
        raise StateDictMismatchError(
            f"cannot restore {path}: nothing was changed; entries {per_rank} are per rank here "
            f"and the step was saved by one process, this job has {session.world_size} ranks. "
            "Pass allow_world_size_change=True to leave them as they are"
        )
    others = {}
    for name, obj in targets.items():
        if name in SHARDED_SLOTS or (name in session.per_rank and session.world_size != 1):
            continue
        precheck.check_target(name, path, entries[name][1], obj, strict=strict)
        others[name] = loaded.value(name)
    return SinglePlan(loaded, model_state, optim_state, others)


def apply(
    session: SessionBase,
    checked: SinglePlan,
    targets: Mapping[str, Any],
    *,
    strict: bool,
    restore_rng: bool,
) -> dict[str, Any]:
    """Load a checked step into the live objects (every rank has passed its checks); return
    the plain values saved with it."""
    entries = checked.loaded.entries
    if checked.model is not None:
        options = dataclasses.replace(
            session.options or StateDictOptions(),
            full_state_dict=True,
            broadcast_from_rank0=False,
            flatten_optimizer_state_dict=False,
            strict=strict,
        )
        set_state_dict(
            targets["model"],
            optimizers(targets.get("optimizer")),
            model_state_dict=checked.model,
            optim_state_dict=checked.optimizer or {},
            options=options,
        )
    for name, state in checked.others.items():
        targets[name].load_state_dict(state)
    if restore_rng and RNG_ENTRY in entries and session.world_size == 1:
        rng.restore(checked.loaded.value(RNG_ENTRY))
    elif restore_rng and RNG_ENTRY in entries:
        warnings.warn(
            f"resumed on {session.world_size} rank(s) from a step saved by 1 process: the "
            "random generator states were not restored (they are per rank)",
            stacklevel=5,
        )
    return {
        name: checked.loaded.value(name)
        for name, (kind, _) in entries.items()
        if kind == "value" and name != RNG_ENTRY
    }


def _check_model(path: Path, saved: Any, live: Mapping[str, Any], *, strict: bool) -> None:
    """Raise unless the saved full model state fits the live one (global shapes, dtypes)."""
    fix = "pass the model the step was saved from"
    if not isinstance(saved, Mapping):
        raise StateDictMismatchError(f"cannot restore entry 'model' of {path}: not a state dict")
    stored = tree.flatten(dict(saved)).tensors
    current = tree.flatten(dict(live)).tensors
    missing = sorted(set(current) - set(stored))
    unexpected = sorted(set(stored) - set(current))
    if strict and (missing or unexpected):
        raise StateDictMismatchError(
            f"cannot restore entry 'model' of {path}: nothing was changed; missing in the step: "
            f"{missing[:5]}, not in the model: {unexpected[:5]}. {fix}, or strict=False"
        )
    for key in sorted(set(stored) & set(current)):
        have, want = stored[key], current[key]
        if have.shape != want.shape or (strict and have.dtype != want.dtype):
            raise StateDictMismatchError(
                f"cannot restore entry 'model' of {path}: nothing was changed; {key!r} is "
                f"{have.dtype} {list(have.shape)} in the step but {want.dtype} "
                f"{list(want.shape)} here. {fix}"
            )


def _by_name(saved: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """A single-process optimizer state (keyed by parameter index) keyed by parameter name,
    pairing each saved group's indices with the live group's names, in order (the group and
    parameter counts were checked equal)."""
    names: dict[Any, str] = {}
    groups = []
    for saved_group, live_group in zip(saved["param_groups"], live["param_groups"], strict=True):
        for index, name in zip(saved_group["params"], live_group["params"], strict=True):
            names[index] = name
        groups.append({**saved_group, "params": list(live_group["params"])})
    state: dict[str, Any] = {names[index]: value for index, value in saved["state"].items()}
    return {"state": state, "param_groups": groups}
