"""Training checkpoints: atomic, verified, retained by policy, restored exactly."""

from typing import Any

from . import describe as _describe  # noqa: F401  (registers the inspect describers)
from .manager import CheckpointManager, Restored
from .migrate import import_torch_checkpoint


def import_dcp(dcp_dir: Any, ckpt_dir: Any, *, step: int = 0, overwrite: bool = False) -> Any:
    """Import a ``torch.distributed.checkpoint.save`` checkpoint as a step, running no code
    from it; see :func:`torchkeep.checkpoint.distributed.dcp_import.import_dcp`."""
    from .distributed.dcp_import import import_dcp as _import_dcp

    return _import_dcp(dcp_dir, ckpt_dir, step=step, overwrite=overwrite)


def consolidate(step: Any, destination: Any, *, force: bool = False) -> Any:
    """Merge a sharded step into one safetensors file of full tensors, in one process; see
    :func:`torchkeep.checkpoint.distributed.consolidate.consolidate`."""
    from .distributed.consolidate import consolidate as _consolidate

    return _consolidate(step, destination, force=force)


__all__ = [
    "CheckpointManager",
    "Restored",
    "consolidate",
    "import_dcp",
    "import_torch_checkpoint",
]
