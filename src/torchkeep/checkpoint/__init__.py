"""Training checkpoints: atomic, verified, retained by policy, restored exactly."""

from .manager import CheckpointManager, Restored
from .migrate import import_torch_checkpoint

__all__ = ["CheckpointManager", "Restored", "import_torch_checkpoint"]
