"""The full (unsharded) tensors of a sharded step, in one process, without a process group.

DCP's planner assembles every tensor from its chunks (the resharding path, here to one rank)
and torchkeep's reader verifies each chunk's hash before it is used. This is what
``convert``/``consolidate``, ``tk.load_state_dict`` on a sharded step and
``CheckpointManager.export_torch`` of a sharded step read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ... import tree
from ...errors import CorruptFileError, FileFormatError, TorchkeepError, first_line
from ..entries import Kind
from ..layout import RNG_ENTRY, STATE_NAME
from ..reader import LoadedStep
from .layout import RANK_PREFIX, tensor_key
from .reader import _DTYPES, read_index
from .verified_load import VerifiedLoad


def full_tensors(
    step: Path, *, entry: str | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest, ``state.json`` and whole tensors of the sharded step ``step``.

    Args:
        step: a sharded step directory.
        entry: only the tensors of this entry (``"model"``); None for every entry's.
            Per-rank tensors (random generator states, ``per_rank=`` entries) are never read.

    Returns:
        ``(manifest, state, tensors)``; keys are the step's (``model/layers.0.weight``).

    Raises:
        ChecksumMismatchError: a chunk does not match its hash (nothing is returned).
        CorruptFileError: the step is not a valid sharded step.
    """
    manifest, state = read_index(step)
    prefix = None if entry is None else tensor_key(entry, "")
    full: dict[str, torch.Tensor] = {}
    for key, tensor in state["tensors"].items():
        if key.startswith(RANK_PREFIX) or (prefix is not None and not key.startswith(prefix)):
            continue
        dtype = _DTYPES.get(tensor["dtype"])
        if dtype is None:
            raise CorruptFileError(
                f"{step / STATE_NAME}: tensor {key!r} has unknown dtype {tensor['dtype']!r}"
            )
        full[key] = torch.empty(tensor["shape"], dtype=dtype)
    try:
        load = VerifiedLoad(step, manifest, state, full)
        try:
            load.copy()
        finally:
            load.close()
    except TorchkeepError:
        raise
    except Exception as exc:
        raise CorruptFileError(f"{step} could not be read: {first_line(exc)}") from exc
    return manifest, state, full


def entry_values(
    step: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[Kind, Any]]:
    """Every entry stored once for all ranks (sharded or replicated), rebuilt as
    ``(kind, value)`` from the full ``tensors``; per-rank entries are left out (they have one
    value per rank)."""
    entries: dict[str, tuple[Kind, Any]] = {}
    for name, entry in state["entries"].items():
        if entry["scope"] == "per_rank":
            continue
        prefix = tensor_key(name, "")
        flat = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
        value = tree.unflatten(entry["value"], flat, source=f"{step / STATE_NAME} ({name!r})")
        entries[name] = (entry["kind"], value)
    return entries


def read_sharded_step(step: Path) -> LoadedStep:
    """The sharded step ``step`` as a :class:`~torchkeep.checkpoint.reader.LoadedStep` of
    full tensors (what ``export_torch`` writes), every chunk verified.

    Per-rank entries are left out: they hold one value per rank, and one process has no rank
    to take. The random generator states go silently (no reader of one process restores
    another process's generators; ``export_torch`` leaves them out of any step); ``per_rank=``
    entries are named in a ``UserWarning``, so that an export never drops user state unsaid.
    """
    manifest, state, tensors = full_tensors(step)
    shared = {n: e for n, e in state["entries"].items() if e["scope"] != "per_rank"}
    dropped = sorted(set(state["entries"]) - set(shared) - {RNG_ENTRY})
    if dropped:
        warnings.warn(
            f"{step} was saved by {state['world_size']} ranks: its per-rank entries "
            f"{dropped} hold one value per rank and are left out of what is read in one "
            f"process; restore them with a distributed CheckpointManager on "
            f"{state['world_size']} ranks",
            stacklevel=3,
        )
    flat: dict[str, dict[str, torch.Tensor]] = {}
    for name in shared:
        prefix = tensor_key(name, "")
        flat[name] = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
    return LoadedStep(
        state["step"],
        step,
        manifest,
        entry_values(step, state, tensors),
        {name: entry["value"] for name, entry in shared.items()},
        flat,
    )


def model_state(step: Path) -> dict[str, torch.Tensor]:
    """The model's full state dict (``model=`` entry) of the sharded step ``step``, verified.

    Raises:
        FileFormatError: the step holds no model.
        ChecksumMismatchError / CorruptFileError: as :func:`full_tensors`.
    """
    _manifest, state, tensors = full_tensors(step, entry="model")
    if "model" not in state["entries"]:
        raise FileFormatError(
            f"{step} holds no model weights (it was saved without model=); restore it with "
            "CheckpointManager.restore"
        )
    value = entry_values(step, {**state, "entries": {"model": state["entries"]["model"]}}, tensors)
    return dict(value["model"][1])
