"""DCP ``StorageReader`` of sharded-v1 steps, and a load planner that never unpickles.

``read_metadata`` builds DCP's ``Metadata`` from the step's JSON documents (no ``.metadata``
pickle exists). ``prepare_local_plan`` runs inside DCP's "plan" collective: there every rank
stages exactly the chunks it needs (:mod:`.staging`: mapped where the page cache holds them,
read into memory of its own otherwise), hashes them and raises on a mismatch, so a damaged
shard makes every rank fail before ``read_data`` copies a single byte into a live tensor. The
bytes hashed are the bytes copied, unless someone writes to a cached shard file while the
restore runs (see :mod:`.staging`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ...compat import require_sharded_checkpoints
from ...errors import (
    ChecksumMismatchError,
    CorruptFileError,
    FileFormatError,
    UnsafeCheckpointError,
)
from ...hashing import hash_file
from ...manifest import files_folder
from ..layout import STATE_NAME, read_step_manifest
from . import staging
from .layout import DTYPES, is_sharded, read_sharded_state

_DTYPES = DTYPES


def read_index(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and verified ``state.json`` of the sharded step at ``path``.

    Raises:
        TorchkeepFileNotFoundError: the step was never committed.
        FileFormatError: the step is a single-process one (``CheckpointManager.restore``
            restores those on any number of ranks; this reader reads sharded steps).
        CorruptFileError: a document is invalid or ``state.json`` fails its hash.
    """
    manifest = read_step_manifest(path)
    if not is_sharded(manifest):
        raise FileFormatError(
            f"{path} is a single-process step (saved without torch.distributed), not a sharded "
            "one. Restore it with CheckpointManager(folder).restore(...), which restores "
            "single-process steps on any number of ranks, or load its weights with "
            "tk.load_state_dict(step)"
        )
    record = manifest["files"].get(STATE_NAME)
    if record is None:
        raise CorruptFileError(f"{path / 'manifest.json'} does not list {STATE_NAME}")
    state_path = files_folder(path, manifest) / STATE_NAME
    size, digest = hash_file(state_path)
    if size != record["size"] or digest != record["hash"]:
        raise ChecksumMismatchError(
            f"{state_path} does not match its manifest (size or hash); the step is damaged"
        )
    return manifest, read_sharded_state(path, manifest)


def build_metadata(state: dict[str, Any], source: Path) -> Metadata:
    """DCP ``Metadata`` of a sharded step from its ``state.json`` index (no pickle)."""
    described: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    storage: dict[MetadataIndex, dict[str, Any]] = {}
    for key, tensor in state["tensors"].items():
        dtype = _DTYPES.get(tensor["dtype"])
        if dtype is None:
            raise CorruptFileError(
                f"{source}: tensor {key!r} has unknown dtype {tensor['dtype']!r}"
            )
        chunks = []
        for chunk in tensor["chunks"]:
            offsets = torch.Size(chunk["offsets"])
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(chunk["sizes"])))
            storage[MetadataIndex(key, offsets)] = {**chunk, "dtype": dtype}
        described[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(tensor["shape"]),
            chunks=chunks,
        )
    return Metadata(state_dict_metadata=described, storage_data=storage, storage_meta=StorageMeta())


class TorchkeepStorageReader(StorageReader):
    """Read a torchkeep sharded step with DCP on any number of ranks, verified, no pickle.

    Use with ``torch.distributed.checkpoint.load(state_dict, storage_reader=reader,
    planner=NoPickleLoadPlanner())``; DCP's planner reshards (a step written by 4 ranks loads
    on 2, or on 1 with ``no_dist=True``).

    Args:
        path: the step directory (``ckpt/step-00000100``).
        verify: hash every chunk a rank reads before it is used (on by default).
        opener: where the shards' bytes come from (default: the files in ``path``; a sharded
            step on object storage passes its objects, read by ranges, and ``path`` is a
            local copy of its documents).

    Raises (from ``dcp.load``, wrapped in DCP's ``CheckpointException``):
        ChecksumMismatchError: a chunk or file does not match its recorded hash or size.
        CorruptFileError: the step's documents are invalid.

    Example:
        >>> dcp.load(state, storage_reader=TorchkeepStorageReader("ckpt/step-00000100"),
        ...          planner=NoPickleLoadPlanner())
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        verify: bool = True,
        opener: staging.Opener | None = None,
    ) -> None:
        super().__init__()
        require_sharded_checkpoints("TorchkeepStorageReader")
        self.path = Path(path)
        self.verify = verify
        self.opener = opener
        self.manifest: dict[str, Any] = {}
        self.state: dict[str, Any] = {}
        self._storage: dict[MetadataIndex, dict[str, Any]] = {}
        self._chunks: dict[tuple[str, int, int], torch.Tensor] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        self._close()

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP would retry per rank
        return self.use_index(*read_index(self.path))

    def use_index(self, manifest: dict[str, Any], state: dict[str, Any]) -> Metadata:
        """Read the step through its already verified documents (:func:`read_index`);
        DCP's ``Metadata`` of them."""
        self.manifest, self.state = manifest, state
        return build_metadata(state, files_folder(self.path, manifest) / STATE_NAME)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        needed = []
        for item in plan.items:
            record = self._storage[item.storage_index]
            needed.append(
                staging.ChunkRef(
                    record["file"],
                    record["offset"],
                    record["length"],
                    record["hash"],
                    item.storage_index.fqn,
                )
            )
        sizes = {name: entry["size"] for name, entry in self.manifest["files"].items()}
        self._chunks = staging.stage(
            files_folder(self.path, self.manifest),
            needed,
            sizes,
            verify=self.verify,
            opener=self.opener,
        )
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self.copy(plan.items, planner)
        self._close()
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def copy(self, items: list[ReadItem], planner: LoadPlanner) -> None:
        """Copy the staged, verified chunks of ``items`` into ``planner``'s tensors (after
        ``prepare_local_plan``)."""
        for request in items:
            record = self._storage[request.storage_index]
            chunk = self._stored(record)
            boxes = zip(request.storage_offsets, request.lengths, strict=True)
            for dim, (offset, length) in enumerate(boxes):
                chunk = chunk.narrow(dim, offset, length)
            target = planner.resolve_tensor(request).detach()
            if target.size() != chunk.size():
                raise CorruptFileError(
                    f"{self.path}: {request.storage_index.fqn!r} holds {tuple(chunk.size())} "
                    f"where {tuple(target.size())} is needed; the step is damaged"
                )
            target.copy_(chunk)
            planner.commit_tensor(request, target)

    def _stored(self, record: dict[str, Any]) -> torch.Tensor:
        """A verified chunk (read by prepare_local_plan) as a tensor of its dtype and shape."""
        dtype: torch.dtype = record["dtype"]
        raw = self._chunks[(record["file"], record["offset"], record["length"])]
        if not record["length"]:
            return torch.empty(record["sizes"], dtype=dtype)
        return raw.view(dtype).reshape(record["sizes"])

    def _close(self) -> None:
        """Let go of the staged chunks (their memory and mappings)."""
        self._chunks.clear()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True


class NoPickleLoadPlanner(DefaultLoadPlanner):
    """DCP's ``DefaultLoadPlanner`` that refuses byte items instead of unpickling them.

    DCP stores non-tensor values as ``torch.save`` bytes and loads them with
    an unrestricted ``torch.load``; this planner raises
    :class:`~torchkeep.UnsafeCheckpointError` instead (torchkeep steps hold no byte items).
    """

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise UnsafeCheckpointError(
            f"{read_item.dest_index.fqn!r} is a pickled DCP byte item; torchkeep never "
            "unpickles checkpoint data (import a DCP checkpoint with "
            "torchkeep.checkpoint.import_dcp)"
        )
