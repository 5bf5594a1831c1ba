"""The sharded-v1 writer on object storage: every rank uploads its own shard, the coordinator
commits the step by creating its manifest exclusively, last.

Same DCP call order as :class:`~.writer.TorchkeepStorageWriter` (whose shard encoding and
segment hashing it reuses); only where the bytes go differs:

- ``_begin`` (coordinator): refuse an existing step, pick a fresh save id; the prefix
  ``step-<n>/<save id>/`` goes to every rank with the plan;
- ``_store`` (every rank): a streamed multipart upload of the rank's shard under the prefix,
  hashed segment by segment on the way (:mod:`torchkeep.storage.objects`);
- ``_commit`` (coordinator, run by DCP only after every rank's upload succeeded): upload
  ``state.json``, then create ``manifest.json`` exclusively
  (:meth:`~torchkeep.checkpoint.remote.RemoteSteps.finish`).

A failed or killed rank leaves no manifest, so no step; ``abort`` deletes the prefix where it
can, else it is an orphan that a later save deletes after the grace period.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...manifest import FileRecord, json_bytes
from ..layout import STATE_NAME
from ..remote import RemoteSteps, Upload
from .layout import FORMAT_VERSION
from .segments import SegmentHasher
from .writer import TorchkeepStorageWriter


class RemoteStorageWriter(TorchkeepStorageWriter):
    """Write a DCP state dict as a torchkeep sharded step under an object-store URL.

    Args:
        remote: the checkpoint folder on object storage.
        step: the step to write.
        state, rank_state, overwrite, manifest_fields: as for
            :class:`~torchkeep.checkpoint.distributed.writer.TorchkeepStorageWriter`.
    """

    def __init__(
        self,
        remote: RemoteSteps,
        step: int,
        *,
        state: Mapping[str, Any] | None = None,
        rank_state: Any = None,
        overwrite: bool = False,
        manifest_fields: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            remote.step_url(step),
            state=state,
            rank_state=rank_state,
            step=step,
            overwrite=overwrite,
            manifest_fields=manifest_fields,
        )
        self.remote = remote
        self.upload: Upload | None = None

    def _begin(self) -> str:
        assert self.step is not None
        self.upload = self.remote.begin(self.step, overwrite=self.overwrite)
        return self.upload.prefix

    def _store(self, location: str, name: str, spans: Any, hasher: SegmentHasher, size: int) -> int:
        return self.remote.store.write_stream(f"{location}/{name}", spans, hasher=hasher).size

    def _commit(
        self, files: dict[str, FileRecord], state: dict[str, Any], fields: dict[str, Any]
    ) -> None:
        if self.upload is None:
            raise RuntimeError("finish() before prepare_global_plan(): not a DCP call order")
        upload = self.upload
        key = f"{upload.prefix}/{STATE_NAME}"
        files[STATE_NAME] = self.remote.store.write(key, json_bytes(state, sort_keys=False))
        # From the manifest's create on, abort() must not delete: a create whose answer was
        # lost may have committed the step (RemoteSteps.finish decides).
        self.upload = None
        fields = {k: v for k, v in fields.items() if k != "step"}
        self.remote.finish(upload, files, fields, format_version=FORMAT_VERSION)

    def abort(self) -> None:
        """Delete the uploads of a save that failed (coordinator; best effort, idempotent)."""
        if self.upload is not None:
            self.remote.abort(self.upload)
            self.upload = None
