"""One rank's part of a sharded step: planned, staged and verified, then copied in the order the
caller chooses.

DCP's load planner decides which chunks this rank needs (it reshards: a step written by 4
ranks loads on 2, or on 1), without any collective; :class:`TorchkeepStorageReader` stages and
hashes them. Nothing is copied until the caller asks, so the distributed manager can fill its
fresh tensors first, check them, agree with the other ranks once (one flag) and only then
copy into live tensors; ``dcp.load`` would spend three object collectives on the same
agreement.
"""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.planner import ReadItem

from .reader import NoPickleLoadPlanner, TorchkeepStorageReader
from .staging import Opener


class VerifiedLoad:
    """The verified chunks of a sharded step that fill ``destination`` on this rank.

    Args:
        path: the step directory.
        manifest, state: its documents, already verified (:func:`.reader.read_index`).
        destination: flat ``{key: tensor}`` to fill (DTensors receive their local part).
        opener: where the shards' bytes come from (default: the files in ``path``).

    Raises:
        ChecksumMismatchError: a chunk does not match its hash (nothing was copied).
        CorruptFileError: the step's documents or files are invalid.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        state: dict[str, Any],
        destination: dict[str, torch.Tensor],
        *,
        opener: Opener | None = None,
    ) -> None:
        self._reader = TorchkeepStorageReader(path, opener=opener)
        metadata = self._reader.use_index(manifest, state)
        self._reader.set_up_storage_reader(metadata, True)
        self._planner = NoPickleLoadPlanner()
        self._planner.set_up_planner(destination, metadata, True)
        plan = self._planner.create_global_plan([self._planner.create_local_plan()])[0]
        try:
            plan = self._planner.finish_plan(self._reader.prepare_local_plan(plan))
        except BaseException:
            self.close()
            raise
        self._pending = list(plan.items)

    def copy(self, keys: Container[str] | None = None) -> None:
        """Copy the verified chunks of the destination tensors named in ``keys`` (every one not
        copied yet when None)."""
        now: list[ReadItem] = []
        later: list[ReadItem] = []
        for item in self._pending:
            (now if keys is None or item.dest_index.fqn in keys else later).append(item)
        self._reader.copy(now, self._planner)
        self._pending = later

    def close(self) -> None:
        """Let go of the staged chunks (their memory and mappings)."""
        self._reader.reset()
