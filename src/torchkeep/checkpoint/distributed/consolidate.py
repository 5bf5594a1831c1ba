"""Merge a sharded step into full tensors in one process, without a process group.

The tensors come from :func:`~torchkeep.checkpoint.distributed.full.full_tensors` (DCP's
planner assembles them, every chunk verified first). 0-dim tensors (Adam's ``step``)
come through as they are; DCP's ``consolidate_safetensors_files`` writes them as 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import DestinationExistsError
from ...weights import save_weights
from .full import full_tensors


@dataclass
class Consolidated:
    """What :func:`consolidate` wrote: the file, how many tensors, the step's world size."""

    destination: Path
    tensors: int
    world_size: int


def consolidate(
    step: str | os.PathLike[str], destination: str | os.PathLike[str], *, force: bool = False
) -> Consolidated:
    """Write every tensor of the sharded step ``step`` whole into one safetensors file.

    Keys are the step's (``model/layers.0.weight``, ``optimizer/state.layers.0.weight.exp_avg``);
    per-rank tensors (RNG states) are left out. Every chunk is verified before it is used; the
    file is written atomically. The whole state is held in memory once.

    Args:
        step: a sharded step directory (``ckpt/step-00000100``).
        destination: the ``.safetensors`` file to write.
        force: replace an existing ``destination``.

    Raises:
        ChecksumMismatchError: a chunk does not match its hash (nothing is written).
        CorruptFileError: the step is not a valid sharded step.
        DestinationExistsError: ``destination`` exists and ``force`` is False.

    Example:
        >>> consolidate("ckpt/step-00000100", "full.safetensors").tensors
        42
    """
    step, destination = Path(step), Path(destination)
    if destination.exists() and not force:
        raise DestinationExistsError(
            f"{destination} already exists; pass force=True (--force) to overwrite it"
        )
    manifest, state, full = full_tensors(step)
    save_weights(
        full,
        destination,
        metadata={
            "source_step": str(manifest["step"]),
            "source_world_size": str(state["world_size"]),
        },
    )
    return Consolidated(destination, len(full), state["world_size"])
