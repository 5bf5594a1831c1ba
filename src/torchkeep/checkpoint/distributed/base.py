"""What the distributed CheckpointManager's save and restore share: the ranks and settings.

The collective save lives in :mod:`.saving`, the collective restore in :mod:`.restoring`;
:class:`~torchkeep.checkpoint.distributed.session.DistributedSession` joins them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint.state_dict import StateDictOptions

from ...storage.cache import CachePolicy
from ..entries import check_name
from . import collective

if TYPE_CHECKING:
    from ..remote import RemoteSteps

SHARDED_SLOTS = ("model", "optimizer")


def optimizers(optimizer: Any) -> list[Any]:
    """``optimizer=`` as the list ``get_state_dict``/``set_state_dict`` take."""
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


class SessionBase:
    """The ranks and settings of a distributed manager's collective half.

    Args:
        directory: the checkpoint folder (shared by every rank).
        group: the checkpoint process group, or None for one process without a group.
        options: ``StateDictOptions`` for ``get_state_dict``/``set_state_dict``.
        per_rank: names of entries whose state differs per rank.
        save_rng: store every rank's random generator states.
        remote: the checkpoint folder when it is on object storage (``directory`` is then
            unused): every rank uploads and reads its own part there.
        cache: the page-cache policy of the shard files a save writes
            (:mod:`torchkeep.storage.cache`).
    """

    def __init__(
        self,
        directory: Path,
        *,
        group: Any,
        options: StateDictOptions | None,
        per_rank: Sequence[str],
        save_rng: bool,
        remote: RemoteSteps | None = None,
        cache: CachePolicy = "auto",
    ) -> None:
        self.directory = directory
        self.remote = remote
        self.group = group
        self.options = options
        self.per_rank = frozenset(per_rank)
        self.save_rng = save_rng
        self.cache = cache
        self.rank = collective.rank(group)
        self.world_size = collective.world_size(group)

    @property
    def location(self) -> str:
        """The checkpoint folder, for messages (a URL on object storage)."""
        return self.remote.url if self.remote is not None else str(self.directory)


def entry_names_ok(names: Sequence[str]) -> list[str]:
    """Validate ``per_rank`` names as entry names."""
    return [check_name(n) for n in names]
