"""overwrite=True on object storage (issue 13): the manifest is replaced only if it did not
change since it was read (S3 If-Match), the old data goes after, and a reader that loses the
old data to a replace reads the step again."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.remote.server import Bucket
from torchkeep.checkpoint.remote import RemoteSteps
from torchkeep.storage.store import ObjectStore

pytest.importorskip("fsspec")


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(5, 3)


def _equal(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def _save_ids(bucket: Bucket, step: str) -> set[str]:
    store = ObjectStore(f"{bucket.url}/run", storage_options=bucket.storage_options)
    return {key.split("/")[1] for key in store.keys(step) if key.count("/") == 2}


@pytest.fixture(params=["memory_bucket", "s3_bucket"])
def bucket(request: pytest.FixtureRequest) -> Bucket:
    value: Bucket = request.getfixturevalue(request.param)
    return value


def test_overwrite_replaces_the_step_and_its_data(bucket: Bucket) -> None:
    mgr = tk.CheckpointManager(f"{bucket.url}/run", storage_options=bucket.storage_options)
    first, second = _model(1), _model(2)
    mgr.save(1, model=first, version="first")
    old_ids = _save_ids(bucket, "step-00000001")
    mgr.save(1, model=second, overwrite=True, version="second")
    new_ids = _save_ids(bucket, "step-00000001")
    assert len(new_ids) == 1
    assert not new_ids & old_ids  # the old data is gone, the new lives under its own id
    target = nn.Linear(5, 3)
    restored = mgr.restore(model=target)
    assert restored.extra["version"] == "second"
    assert _equal(target, second)
    assert mgr.steps == [1]
    mgr.save(2, model=first, overwrite=True)  # overwrite of a step that does not exist: a save
    assert mgr.steps == [1, 2]


def test_overwrite_loses_to_a_concurrent_replace(
    s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    lose_to_a_concurrent_replace(s3_bucket, monkeypatch)


def lose_to_a_concurrent_replace(bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer replaces the step between our read of its version and our replace."""
    url = f"{bucket.url}/run"
    mine, theirs = _model(3), _model(4)
    tk.CheckpointManager(url, storage_options=bucket.storage_options).save(1, model=mine)
    original = RemoteSteps._commit_manifest
    other = {**bucket.storage_options, "skip_instance_cache": True}  # another client

    def another_writer_replaces_first(self: RemoteSteps, *args: Any) -> None:
        monkeypatch.setattr(RemoteSteps, "_commit_manifest", original)
        tk.CheckpointManager(url, storage_options=other).save(
            1, model=theirs, overwrite=True, writer="theirs"
        )
        original(self, *args)  # our replace names the manifest version we read: refused

    monkeypatch.setattr(RemoteSteps, "_commit_manifest", another_writer_replaces_first)
    mgr = tk.CheckpointManager(url, storage_options=bucket.storage_options)
    with pytest.raises(tk.StepExistsError, match="another writer"):
        mgr.save(1, model=mine, overwrite=True, writer="mine")
    target = nn.Linear(5, 3)
    assert mgr.restore(model=target).extra["writer"] == "theirs"
    assert _equal(target, theirs)
    assert len(_save_ids(bucket, "step-00000001")) == 1  # ours was deleted


def test_reader_that_loses_the_old_data_to_a_replace_reads_again(
    s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{s3_bucket.url}/run"
    mgr = tk.CheckpointManager(url, storage_options=s3_bucket.storage_options)
    mgr.save(1, model=_model(5), version="old")
    newer = _model(6)
    original = ObjectStore.download_many
    replaced: list[bool] = []

    def replace_then_download(self: ObjectStore, *args: Any) -> set[str]:
        if not replaced:  # the reader has the old manifest; a writer replaces the step now
            replaced.append(True)
            writer = tk.CheckpointManager(url, storage_options=s3_bucket.storage_options)
            writer.save(1, model=newer, overwrite=True, version="new")
        return original(self, *args)

    monkeypatch.setattr(ObjectStore, "download_many", replace_then_download)
    target = nn.Linear(5, 3)
    restored = mgr.restore(model=target)
    assert restored.extra["version"] == "new"
    assert _equal(target, newer)


def test_overwrite_needs_a_conditional_replace(
    memory_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from torchkeep.storage import remote

    class NoReplaceFileSystem(MemoryFileSystem):  # type: ignore[misc]
        """Creates exclusively (as memory:// does) but has no conditional replace."""

        protocol = "tknoreplace"

    fsspec.register_implementation("tknoreplace", NoReplaceFileSystem, clobber=True)
    name = f"{NoReplaceFileSystem.__module__}.{NoReplaceFileSystem.__qualname__}"
    memory = remote.EXCLUSIVE_CREATE["fsspec.implementations.memory.MemoryFileSystem"]
    monkeypatch.setitem(remote.EXCLUSIVE_CREATE, name, memory)
    mgr = tk.CheckpointManager("tknoreplace://gate/run")
    mgr.save(1, model=_model(7))
    with pytest.raises(tk.StorageCapabilityError, match="conditional replace"):
        mgr.save(1, model=_model(8), overwrite=True)
    assert len(_save_ids(Bucket("tknoreplace://gate", {}), "step-00000001")) == 1
