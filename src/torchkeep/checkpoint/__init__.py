"""Training checkpoints: atomic, verified, retained by policy, restored exactly."""

from . import describe as _describe  # noqa: F401  (registers the inspect describers)
from .manager import CheckpointManager, Restored
from .migrate import import_torch_checkpoint

__all__ = ["CheckpointManager", "Restored", "import_torch_checkpoint"]
