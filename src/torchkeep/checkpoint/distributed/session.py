"""The distributed CheckpointManager's collective half: save (:mod:`.saving`) and restore
(:mod:`.restoring`) on the ranks and settings of :mod:`.base`."""

from __future__ import annotations

from .base import entry_names_ok
from .restoring import RestoredState, RestoringSession
from .saving import Prepared, SavingSession, snapshot

__all__ = [
    "DistributedSession",
    "Prepared",
    "RestoredState",
    "entry_names_ok",
    "snapshot",
]


class DistributedSession(SavingSession, RestoringSession):
    """The collective half of a distributed :class:`~torchkeep.CheckpointManager`: its
    arguments are :class:`~torchkeep.checkpoint.distributed.base.SessionBase`'s."""
