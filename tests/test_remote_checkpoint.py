"""CheckpointManager on object storage (issue 13): memory:// and a real S3 API (moto on loopback).

Round trips bit-exact with exact resume; the commit protocol (manifest created exclusively last,
per-save data prefixes, racing writers, lost answers); retention manifest-first; listing
freshness; orphans after the grace period; the capability gate; faults through the proxy.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.remote.server import Bucket
from torchkeep.checkpoint.remote import RemoteSteps
from torchkeep.storage.store import ObjectStore

pytest.importorskip("fsspec")


def _trained(seed: int, steps: int = 2) -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    _train(model, optimizer, scheduler, steps)
    return model, optimizer, scheduler


def _train(model: nn.Module, optimizer: Any, scheduler: Any, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(4, 6)  # drawn from the global generator: resume must restore it
        loss = model(nn.functional.dropout(x, 0.3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _fresh() -> tuple[nn.Module, Any, Any]:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.fixture(params=["memory_bucket", "s3_bucket"])
def bucket(request: pytest.FixtureRequest) -> Bucket:
    value: Bucket = request.getfixturevalue(request.param)
    return value


def _manager(bucket: Bucket, **kwargs: Any) -> tk.CheckpointManager:
    return tk.CheckpointManager(
        f"{bucket.url}/run", storage_options=bucket.storage_options, **kwargs
    )


def _keys(bucket: Bucket) -> list[str]:
    return sorted(ObjectStore(f"{bucket.url}/run", storage_options=bucket.storage_options).keys())


def test_round_trip_resumes_exactly(bucket: Bucket) -> None:
    model, optimizer, scheduler = _trained(seed=1)
    mgr = _manager(bucket, keep_last=None)
    where = mgr.save(7, model=model, optimizer=optimizer, scheduler=scheduler, epoch=3)
    assert where == f"{mgr.directory}/step-00000007"
    _train(model, optimizer, scheduler, 3)  # the straight run goes on from the save

    again, opt2, sched2 = _fresh()
    torch.manual_seed(99)  # another generator state: the restore must put the saved one back
    restored = _manager(bucket).restore(model=again, optimizer=opt2, scheduler=sched2)
    assert (restored.step, restored.extra, restored.path) == (7, {"epoch": 3}, where)
    _train(again, opt2, sched2, 3)
    assert _same(model, again)
    assert optimizer.state_dict()["state"][0]["exp_avg"].equal(
        opt2.state_dict()["state"][0]["exp_avg"]
    )
    assert scheduler.state_dict() == sched2.state_dict()


def test_layout_data_under_a_save_id_and_the_manifest_beside_it(bucket: Bucket) -> None:
    model, _, _ = _trained(seed=2)
    mgr = _manager(bucket)
    mgr.save(1, model=model)
    keys = _keys(bucket)
    assert "step-00000001/manifest.json" in keys
    data = [key.split("/") for key in keys if not key.endswith("manifest.json")]
    assert {len(parts) for parts in data} == {3}
    save_ids = {parts[1] for parts in data}
    assert len(save_ids) == 1
    assert {parts[2] for parts in data} >= {"model.safetensors", "state.json"}
    info = RemoteSteps(f"{bucket.url}/run", storage_options=bucket.storage_options).committed()
    assert info[0].manifest["data"] == save_ids.pop()


def test_existing_step_is_refused(bucket: Bucket) -> None:
    model, _, _ = _trained(seed=3)
    mgr = _manager(bucket)
    mgr.save(1, model=model)
    before = _keys(bucket)
    with pytest.raises(tk.StepExistsError, match="step-00000001"):
        mgr.save(1, model=model)
    assert _keys(bucket) == before


def test_retention_removes_every_object_of_retired_steps(bucket: Bucket) -> None:
    model, _, _ = _trained(seed=4)
    mgr = _manager(bucket, keep_last=2, keep_best=1, monitor="loss")
    for step, loss in ((1, 0.1), (2, 0.5), (3, 0.4), (4, 0.3)):
        mgr.save(step, model=model, metrics={"loss": loss})
    assert mgr.steps == [1, 3, 4]
    assert mgr.best_step == 1
    assert not [key for key in _keys(bucket) if key.startswith("step-00000002")]


def test_corrupt_latest_step_falls_back_and_changes_nothing(bucket: Bucket) -> None:
    model, _, _ = _trained(seed=5)
    mgr = _manager(bucket)
    mgr.save(1, model=model)
    newer, _, _ = _trained(seed=6)
    mgr.save(2, model=newer)
    store = ObjectStore(f"{bucket.url}/run", storage_options=bucket.storage_options)
    (key,) = [k for k in store.keys("step-00000002") if k.endswith("model.safetensors")]
    data = bytearray(store.read(key))
    data[-1] ^= 0xFF  # a flipped byte in the last tensor
    store.write(key, bytes(data))

    target, _, _ = _fresh()
    untouched = {name: value.clone() for name, value in target.state_dict().items()}
    with pytest.raises(tk.ChecksumMismatchError, match="step-00000002"):
        mgr.restore(2, model=target)
    assert all(torch.equal(untouched[name], v) for name, v in target.state_dict().items())
    with pytest.warns(UserWarning, match="step 2 is unusable"):
        restored = mgr.restore(model=target)
    assert restored.step == 1
    assert _same(target, model)


def test_listing_sees_another_writers_commit_at_once(s3_bucket: Bucket) -> None:
    sees_another_writers_commit(s3_bucket)


def sees_another_writers_commit(bucket: Bucket) -> None:
    """A step another client (as another process) committed is listed at once."""
    reader = _manager(bucket)
    model, _, _ = _trained(seed=7)
    reader.save(1, model=model)
    assert reader.steps == [1]  # the filesystem (s3fs, gcsfs) has now cached the listing
    other = {**bucket.storage_options, "skip_instance_cache": True}  # another client
    tk.CheckpointManager(f"{bucket.url}/run", storage_options=other).save(2, model=model)
    assert reader.steps == [1, 2]


def test_racing_writers_exactly_one_commits(
    s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    race_two_writers(s3_bucket, monkeypatch)


def race_two_writers(bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writers (each its own client, as two processes) of one step: exactly one commits."""
    both_uploaded = threading.Barrier(2, timeout=60)
    original = RemoteSteps._commit_manifest

    def create_after_both_uploaded(self: RemoteSteps, *args: Any) -> None:
        both_uploaded.wait()  # both writers passed the existence check and uploaded their data
        original(self, *args)

    monkeypatch.setattr(RemoteSteps, "_commit_manifest", create_after_both_uploaded)
    models = [_trained(seed=10 + i)[0] for i in range(2)]
    outcomes: list[object] = [None, None]

    def write(i: int) -> None:
        options = {**bucket.storage_options, "skip_instance_cache": True}
        mgr = tk.CheckpointManager(f"{bucket.url}/run", storage_options=options)
        try:
            mgr.save(5, model=models[i], writer=i)
            outcomes[i] = "committed"
        except tk.StepExistsError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(map(str, outcomes)).count("committed") == 1
    loser = next(o for o in outcomes if isinstance(o, tk.StepExistsError))
    assert "another writer" in str(loser)
    winner = outcomes.index("committed")
    target, _, _ = _fresh()
    restored = _manager(bucket).restore(model=target)
    assert restored.extra["writer"] == winner
    assert _same(target, models[winner])
    save_ids = {key.split("/")[1] for key in _keys(bucket) if key.count("/") == 2}
    assert len(save_ids) == 1  # the loser's prefix is gone


def test_transfer_is_validated() -> None:
    with pytest.raises(ValueError, match="5 MiB"):
        tk.Transfer(part_size=1 << 20)
    with pytest.raises(ValueError, match="max_concurrency"):
        tk.Transfer(max_concurrency=0)
    with pytest.raises(ValueError, match="deadline_s"):
        tk.Transfer(deadline_s=0)


def test_local_path_refuses_storage_options(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="storage_options"):
        tk.CheckpointManager(tmp_path, storage_options={"anon": True})


def test_backend_without_exclusive_create_is_gated(memory_bucket: Bucket) -> None:
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class PlainFileSystem(MemoryFileSystem):  # type: ignore[misc]
        """A back end torchkeep knows no atomic exclusive create for."""

        protocol = "tkplain"

    fsspec.register_implementation("tkplain", PlainFileSystem, clobber=True)
    url = "tkplain://gate/run"
    with pytest.raises(tk.StorageCapabilityError, match="single_writer=True"):
        tk.CheckpointManager(url)
    with pytest.warns(UserWarning, match="single_writer=True promises one writer"):
        mgr = tk.CheckpointManager(url, transfer=tk.Transfer(single_writer=True))
    model, _, _ = _trained(seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr.save(1, model=model)
        target, _, _ = _fresh()
        mgr.restore(model=target)
    assert _same(target, model)
    with pytest.raises(tk.StepExistsError):
        mgr.save(1, model=model)


def test_orphans_are_removed_only_after_the_grace_period(s3_bucket: Bucket) -> None:
    root = f"{s3_bucket.url}/run"
    store = ObjectStore(root, storage_options=s3_bucket.storage_options)
    orphan = "step-00000009/0123456789abcdef/model.safetensors"  # a killed writer's data
    store.write(orphan, b"x" * 100)
    bucket, key, _ = store.fs.split_path(store.root)
    upload = store.fs.call_s3(
        "create_multipart_upload", Bucket=bucket, Key=f"{key}/step-00000010/fedcba9876543210/m"
    )

    def pending() -> list[str]:
        found = store.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key + "/")
        return [u["UploadId"] for u in found.get("Uploads", [])]

    model, _, _ = _trained(seed=9)
    patient = tk.CheckpointManager(
        root, storage_options=s3_bucket.storage_options, transfer=tk.Transfer(orphan_grace_s=3600)
    )
    patient.save(1, model=model)
    assert orphan in sorted(store.keys())
    # (moto reports every multipart upload as initiated in 2010, so its upload is past any
    # grace period here; on S3 the Initiated time is real)
    assert upload["UploadId"] not in pending()
    upload = store.fs.call_s3(
        "create_multipart_upload", Bucket=bucket, Key=f"{key}/step-00000010/fedcba9876543210/m"
    )
    time.sleep(1.1)  # S3 times have whole seconds: let the orphans be older than a zero grace
    eager = tk.CheckpointManager(
        root, storage_options=s3_bucket.storage_options, transfer=tk.Transfer(orphan_grace_s=0)
    )
    eager.save(2, model=model)
    assert orphan not in sorted(store.keys())
    assert pending() == []
    assert eager.steps == [1, 2]  # committed steps are never orphans
    target, _, _ = _fresh()
    eager.restore(1, model=target)
    assert _same(target, model)


def test_errors_name_the_step_url_not_the_private_copy(bucket: Bucket) -> None:
    model, _, _ = _trained(seed=11)
    mgr = _manager(bucket)
    mgr.save(1, model=model)
    with pytest.raises(tk.StateDictMismatchError) as caught:
        mgr.restore(model=nn.Linear(3, 3))
    assert f"{mgr.directory}/step-00000001" in str(caught.value)
    assert "torchkeep-remote-" not in str(caught.value)
