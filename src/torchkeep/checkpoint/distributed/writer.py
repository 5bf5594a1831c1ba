"""DCP ``StorageWriter`` that commits a sharded-v1 step atomically, without pickle.

Call order (DCP's, see ``torch.distributed.checkpoint.storage``) and what happens at each hook:
``prepare_local_plan`` refuses byte items (DCP would pickle them) and carries this rank's JSON
state to the coordinator; ``prepare_global_plan`` (coordinator) refuses an existing step,
creates the hidden temporary directory every rank writes into and names the files;
``write_data`` streams the rank's chunks into one safetensors file through torchkeep's
block writer (page cache or direct I/O by the ``cache=`` policy, :mod:`...storage.cache`),
hashing every byte once per chunk, and fsyncs it; ``finish`` (coordinator,
run by DCP only when every rank's ``write_data`` succeeded) writes ``state.json`` and
``manifest.json`` last, fsyncs and renames the temporary directory into place.

Where the bytes go is three hooks (``_begin``, ``_store``, ``_commit``);
:class:`~.remote_writer.RemoteStorageWriter` puts them on object storage instead.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..._version import __version__
from ...compat import require_sharded_checkpoints
from ...errors import StepExistsError, UnsupportedValueError
from ...formats import safetensors as st
from ...manifest import FileRecord, write_json, write_manifest
from ...storage.cache import CachePolicy, check_cache_policy, refill_after_save, write_mode
from ...storage.local import _rename_into_place, _storage_error, fsync_dir, fsync_file, temp_sibling
from ...storage.stream import write_stream
from ..layout import KIND, STATE_NAME
from .layout import FORMAT_VERSION, LAYOUT, shard_name
from .segments import SegmentHasher, cut_points


def _placed_spans(placed: list[tuple[str, torch.Tensor, int, int]], header: bytes) -> Any:
    """The memory of a shard file: the header, then each placed tensor's bytes."""
    buffer = bytearray(header)
    yield ctypes.addressof(ctypes.c_char.from_buffer(buffer)), len(buffer)
    for _key, tensor, begin, end in placed:
        if end > begin:
            source = st._contiguous_cpu(tensor)  # a copy must outlive its span: keep it bound
            yield source.data_ptr(), end - begin


class TorchkeepStorageWriter(StorageWriter):
    """Write a DCP state dict as a torchkeep sharded step: safetensors per rank, no pickle.

    Use with ``torch.distributed.checkpoint.save(state_dict, storage_writer=writer)`` on every
    rank. The step appears at ``path`` complete or not at all; its files carry XXH3-128 hashes
    verified by :class:`~torchkeep.distributed.TorchkeepStorageReader` before any byte is used.

    Args:
        path: the step directory to create (its parent is created if missing).
        state: JSON-ready value the coordinator stores in ``state.json`` (``entries``: the
            skeletons of the saved entries; the manager fills it, plain DCP users may leave
            it empty).
        rank_state: this rank's JSON-ready value, stored in ``state.json``'s ``ranks`` list.
        step: the step number recorded in the documents (the ``step-<n>`` name by default).
        overwrite: replace an existing step atomically instead of raising.
        manifest_fields: extra manifest fields (metrics, retention).
        fsync: make every file durable before the commit (turn off only for tests).
        cache: what the shard files leave in the page cache, as for single-process
            checkpoints (:mod:`torchkeep.storage.cache`): ``"auto"`` (the default) writes
            through the page cache while it takes the blocks as fast as direct I/O would, so
            a restore right after the save reads memory; ``"keep"`` always writes through
            it; ``"drop"`` writes with direct I/O and caches nothing. Every policy is equally
            durable.

    Raises:
        CachePolicyError: ``cache`` names no policy.

    Example:
        >>> import torch.distributed.checkpoint as dcp
        >>> writer = TorchkeepStorageWriter("ckpt/step-00000100")
        >>> dcp.save(model.state_dict(), storage_writer=writer)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        state: Mapping[str, Any] | None = None,
        rank_state: Any = None,
        step: int | None = None,
        overwrite: bool = False,
        manifest_fields: Mapping[str, Any] | None = None,
        fsync: bool = True,
        cache: CachePolicy = "auto",
    ) -> None:
        super().__init__()
        require_sharded_checkpoints("TorchkeepStorageWriter")
        self.path = Path(path)
        self.state = dict(state or {})
        self.rank_state = rank_state if rank_state is not None else {}
        self.step = step
        self.overwrite = overwrite
        self.manifest_fields = dict(manifest_fields or {})
        self.fsync = fsync
        self.cache = check_cache_policy(cache)
        self.rank = 0
        self.is_coordinator = True
        self.temp: Path | None = None
        self._rank_states: list[Any] = []

    # DCP protocol ---------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        self.temp = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise UnsupportedValueError(
                    f"{item.index.fqn!r} is not a tensor: DCP would pickle it. Pass non-tensor "
                    "state through CheckpointManager (stored as typed JSON) or as "
                    "TorchkeepStorageWriter(state=...)"
                )
        return dataclasses.replace(plan, storage_data={"rank_state": self.rank_state})

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        location = self._begin()
        self._rank_states = [plan.storage_data["rank_state"] for plan in plans]
        world = len(plans)
        return [
            dataclasses.replace(
                plan, storage_data={"temp": location, "file": shard_name(rank, world)}
            )
            for rank, plan in enumerate(plans)
        ]

    # Where the bytes go (overridden for object storage: .remote_writer) ---------------------
    def _begin(self) -> str:
        """Coordinator: refuse an existing step, make the place every rank writes into and
        return its name (a hidden temporary directory here)."""
        if self.path.exists() and not self.overwrite:
            raise StepExistsError(
                f"checkpoint step {self.path} already exists; pass overwrite=True to replace "
                "it, or save under another step"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_sibling(self.path)
        temp.mkdir()
        self.temp = temp
        return str(temp)

    def _store(self, location: str, name: str, spans: Any, hasher: SegmentHasher, size: int) -> int:
        """Write this rank's shard file ``name`` (``size`` bytes) from ``spans`` into
        ``location`` (what :meth:`_begin` returned), feeding ``hasher`` every byte in order;
        return its size."""
        path = Path(location) / name
        try:
            with open(path, "xb", buffering=0) as f:
                mode = write_mode(self.cache, size)
                written = write_stream(f.fileno(), spans, hasher, mode=mode)
                if self.fsync:
                    os.fsync(f.fileno())
        except OSError as exc:
            raise _storage_error(exc, path) from exc
        # Read back once the coordinator has renamed the step into place (DCP tells only the
        # coordinator when it commits; reading back earlier slows the other ranks' writes).
        refill_after_save(self.cache, [path], committed_at=[self.path / name])
        return written

    def _commit(
        self, files: dict[str, FileRecord], state: dict[str, Any], fields: dict[str, Any]
    ) -> None:
        """Coordinator, once every rank's shard is written: write ``state.json``, then the
        manifest last, and make the step appear (rename)."""
        if self.temp is None:
            raise RuntimeError("finish() before prepare_global_plan(): not a DCP call order")
        temp = self.temp
        try:
            files[STATE_NAME] = write_json(temp / STATE_NAME, state, sort_keys=False)
            if self.fsync:
                fsync_file(temp / STATE_NAME)
            write_manifest(temp, kind=KIND, files=files, format_version=FORMAT_VERSION, **fields)
            if self.fsync:
                fsync_file(temp / "manifest.json")
                fsync_dir(temp)
            _rename_into_place(temp, self.path, overwrite=self.overwrite)
        except OSError as exc:
            self.abort()
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and not self.overwrite:
                raise StepExistsError(
                    f"checkpoint step {self.path} was committed by another writer while this "
                    "one was saving it; this save was discarded"
                ) from None
            raise _storage_error(exc, self.path) from exc
        self.temp = None
        if self.fsync:
            fsync_dir(self.path.parent)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        future: Future[list[WriteResult]] = Future()
        future.set_result(self._write_shard(plan, planner) if plan.items else [])
        return future

    def _write_shard(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        name = plan.storage_data["file"]
        tensors: dict[str, torch.Tensor] = {}
        items = {}
        for item in plan.items:
            data = planner.resolve_data(item)
            if not isinstance(data, torch.Tensor):
                raise UnsupportedValueError(f"{item.index.fqn!r} is not a tensor")
            key = item.index.fqn
            if key in tensors:  # two chunks of one tensor on one rank
                key = f"{key}@{','.join(str(int(o)) for o in item.index.offset or ())}"
            tensors[key] = data.detach()
            items[key] = item
        st.validate_for_save(tensors)
        sharding = {
            key: {"saved_offsets": [int(o) for o in (item.index.offset or ())]}
            for key, item in items.items()
        }
        metadata = {
            "format": "pt",
            "torchkeep.version": __version__,
            "torchkeep.layout": LAYOUT,
            "DCP_SHARDING_INFO": json.dumps(sharding),
            "DCP_VERSION": "1.0",
        }
        placed = st._layout(tensors)
        header = st._encode_header(placed, metadata)
        size = len(header) + sum(end - begin for _k, _t, begin, end in placed)
        points = cut_points(size, [p + len(header) for _k, _t, b, e in placed for p in (b, e)])
        hasher = SegmentHasher(points)
        spans = _placed_spans(placed, header)
        written = self._store(plan.storage_data["temp"], name, spans, hasher, size)
        record = FileRecord(written, hasher.hexdigest())
        results = []
        for key, _tensor, begin, end in placed:
            item = items[key]
            start = len(header) + begin
            results.append(
                WriteResult(
                    index=item.index,
                    size_in_bytes=end - begin,
                    storage_data={
                        "file": name,
                        "offset": start,
                        "length": end - begin,
                        "hash": hasher.chunk_digest(start, start + end - begin),
                        "record": record,
                    },
                )
            )
        return results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        files: dict[str, FileRecord] = {}
        chunks: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
        for rank_results in results:
            for result in rank_results:
                data = result.storage_data
                files[data["file"]] = data["record"]
                offsets = tuple(int(o) for o in (result.index.offset or ()))
                chunks[(result.index.fqn, offsets)] = data
        tensors: dict[str, Any] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise UnsupportedValueError(f"{fqn!r} is not a tensor")
            listed = []
            for chunk in md.chunks:
                data = chunks[(fqn, tuple(int(o) for o in chunk.offsets))]
                listed.append(
                    {
                        "offsets": [int(o) for o in chunk.offsets],
                        "sizes": [int(s) for s in chunk.sizes],
                        **{k: data[k] for k in ("file", "offset", "length", "hash")},
                    }
                )
            tensors[fqn] = {
                "dtype": str(md.properties.dtype).removeprefix("torch."),
                "shape": [int(s) for s in md.size],
                "chunks": listed,
            }
        step = self.step if self.step is not None else _step_of(self.path)
        world = len(results)
        state = {
            "step": step,
            "layout": LAYOUT,
            "world_size": world,
            "entries": self.state.get("entries", {}),
            "ranks": self._rank_states,
            "tensors": tensors,
        }
        fields = {"step": step, "layout": LAYOUT, "world_size": world, **self.manifest_fields}
        self._commit(files, state, fields)

    def abort(self) -> None:
        """Remove the temporary directory of a save that failed (coordinator; idempotent)."""
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id=secrets.token_hex(8))


def _step_of(path: Path) -> int:
    from ..layout import parse_step

    step = parse_step(path.name)
    return 0 if step is None else step
