"""The framework integrations given a bucket URL (moto S3 on loopback, tests/remote/).

Before, every integration made its location a ``pathlib.Path``: ``s3://bucket/run/last.ckpt``
became the local folder ``s3:/bucket/run/last.ckpt`` and nothing reached the bucket. Now the
Lightning plugin writes steps on the bucket (object-storage commit, conditional replace of
``last.ckpt``), and what cannot take a URL refuses it by name before anything is written.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import torchkeep as tk
from tests._compat import needs_sharded_checkpoints
from tests.remote.proxy import FaultProxy
from tests.remote.server import Bucket, create_bucket, s3_options
from tests.test_integrations_lightning import _fit
from torchkeep.integrations.lightning import (
    TorchkeepCheckpointIO,
    convert_ckpt,
    last_checkpoint,
)

Proxied = tuple[FaultProxy, Bucket]
MANIFEST = "manifest.json"


@pytest.fixture
def configured_bucket(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Bucket:
    """A fresh bucket reached through fsspec's own configuration (what ``FSSPEC_S3`` sets), as
    Lightning's ``ModelCheckpoint`` reaches it: no storage_options passed anywhere. The working
    directory is ``tmp_path``, where a URL made a local path would land (``s3:/...``)."""
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "s3", s3_options(moto_endpoint))
    monkeypatch.chdir(tmp_path)
    return Bucket(f"s3://{create_bucket(moto_endpoint)}", s3_options(moto_endpoint))


def _objects(bucket: Bucket, prefix: str) -> list[str]:
    """Every object key under ``bucket.url/prefix``, relative to it, sorted."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **bucket.storage_options)
    root = f"{bucket.url}/{prefix}".removeprefix("s3://")
    return sorted(k[len(root) + 1 :] for k in fs.find(root))


def _checkpoint(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "global_step": step,
        "epoch": step // 10,
        "state_dict": {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)},
        "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": step}}}},
    }


def _assert_same(loaded: dict[str, Any], saved: dict[str, Any]) -> None:
    assert loaded["global_step"] == saved["global_step"]
    assert loaded["loops"] == saved["loops"]
    for key, tensor in saved["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], tensor), key


# ---- the silent local "s3:" folder -----------------------------------------------------------


def test_a_url_is_written_to_the_bucket_not_to_a_local_s3_folder(
    configured_bucket: Bucket, tmp_path: Path
) -> None:
    """Fails on the previous code: the step landed in ``tmp_path/s3:/<bucket>/run/last.ckpt``."""
    url = f"{configured_bucket.url}/run/last.ckpt"
    saved = _checkpoint(7)
    TorchkeepCheckpointIO().save_checkpoint(saved, url)
    assert not (tmp_path / "s3:").exists()
    assert MANIFEST in _objects(configured_bucket, "run/last.ckpt")
    _assert_same(TorchkeepCheckpointIO().load_checkpoint(url), saved)
    assert tk.verify(url).ok  # the step has the layout of every step on object storage
    assert not (tmp_path / "s3:").exists()


# ---- a real Trainer on the bucket ------------------------------------------------------------


def test_fit_and_resume_on_the_bucket_equal_a_straight_local_run(
    configured_bucket: Bucket, tmp_path: Path
) -> None:
    """2 epochs to s3, then a new Trainer resumes from the bucket's last.ckpt to 4: every weight
    equals a straight local 4-epoch run's, and the bucket holds exactly the checkpoints the
    local run kept (save_top_k=2 removed the others, data included). The resume path comes
    from last_checkpoint(): Lightning's own ckpt_path="last" does not find checkpoints on
    object storage (it looks the listed names up on the local disk; Lightning #18261)."""
    warnings.filterwarnings("ignore")
    local_dir = tmp_path / "local"
    straight = _fit(local_dir, 4, TorchkeepCheckpointIO())
    assert last_checkpoint(local_dir) == str(local_dir / "last.ckpt")
    run = f"{configured_bucket.url}/run"
    assert last_checkpoint(run) is None  # set and forget: the first run starts fresh
    _fit(run, 2, TorchkeepCheckpointIO(), last_checkpoint(run))
    resume_from = last_checkpoint(run)
    assert resume_from == f"{run}/last.ckpt"
    resumed = _fit(run, 4, TorchkeepCheckpointIO(), resume_from)

    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    kept = sorted(p.name for p in local_dir.iterdir())
    objects = _objects(configured_bucket, "run")
    assert sorted({key.split("/", 1)[0] for key in objects}) == kept
    assert "last.ckpt" in kept
    assert len(kept) == 3
    for name in kept:  # one manifest and one save id's data per checkpoint: no leftovers
        assert len({k.split("/")[1] for k in objects if k.startswith(name + "/")}) == 2, name
        assert tk.verify(f"{run}/{name}").ok, name
    assert not (tmp_path / "s3:").exists()


# ---- replacing last.ckpt -----------------------------------------------------------------------


def test_a_failed_resave_of_last_ckpt_leaves_the_previous_one_valid(s3_proxy: Proxied) -> None:
    proxy, bucket = s3_proxy
    url = f"{bucket.url}/run/last.ckpt"
    plugin = TorchkeepCheckpointIO(
        storage_options=bucket.storage_options, transfer=tk.Transfer(retries=1)
    )
    first = _checkpoint(1)
    plugin.save_checkpoint(first, url)
    before = _objects(bucket, "run/last.ckpt")

    proxy.add("forbid", method="PUT", path=r"last\.ckpt/[0-9a-f]{16}/")  # a data upload fails
    with pytest.raises(tk.RemoteStorageError, match=re.escape(bucket.url)):
        plugin.save_checkpoint(_checkpoint(2), url)
    proxy.clear()
    _assert_same(plugin.load_checkpoint(url), first)
    assert _objects(bucket, "run/last.ckpt") == before  # the failed save's data was deleted

    proxy.add("forbid", method="PUT", path=r"last\.ckpt/manifest\.json$")  # the replace fails
    with pytest.raises(tk.RemoteStorageError):
        plugin.save_checkpoint(_checkpoint(3), url)
    proxy.clear()
    _assert_same(plugin.load_checkpoint(url), first)
    # the new data stays as an orphan no manifest names (a refused replace is final, but the
    # step layer never deletes data once the manifest was sent)
    assert set(before) <= set(_objects(bucket, "run/last.ckpt"))


def test_resaving_last_ckpt_replaces_its_manifest_conditionally_never_deleting_it(
    s3_proxy: Proxied,
) -> None:
    """No moment without a valid last.ckpt: the new data goes first, then the manifest is
    replaced in one conditional PUT (If-Match), and only then is the old data deleted."""
    proxy, bucket = s3_proxy
    url = f"{bucket.url}/run/last.ckpt"
    plugin = TorchkeepCheckpointIO(storage_options=bucket.storage_options)
    plugin.save_checkpoint(_checkpoint(1), url)
    old_id = next(k.split("/")[0] for k in _objects(bucket, "run/last.ckpt") if k != MANIFEST)
    start = len(proxy.log)
    second = _checkpoint(2)
    plugin.save_checkpoint(second, url)
    log = proxy.log[start:]

    manifest_puts = [r.n for r in log if r.method == "PUT" and r.path.endswith("/" + MANIFEST)]
    data_puts = [r.n for r in log if r.method == "PUT" and not r.path.endswith("/" + MANIFEST)]
    assert len(manifest_puts) == 1
    assert data_puts
    assert max(data_puts) < manifest_puts[0]
    assert not [r for r in log if r.method == "DELETE" and r.path.endswith(MANIFEST)]
    deletes = [r.n for r in log if r.method in ("DELETE", "POST") and "delete" in r.query]
    assert deletes
    assert min(deletes) > manifest_puts[0]
    _assert_same(plugin.load_checkpoint(url), second)
    assert not [k for k in _objects(bucket, "run/last.ckpt") if k.startswith(old_id)]


def test_remove_checkpoint_deletes_the_manifest_first_then_the_data(s3_proxy: Proxied) -> None:
    proxy, bucket = s3_proxy
    url = f"{bucket.url}/run/epoch=0-step=6.ckpt"
    plugin = TorchkeepCheckpointIO(storage_options=bucket.storage_options)
    plugin.save_checkpoint(_checkpoint(6), url)
    plugin.save_checkpoint(_checkpoint(7), f"{bucket.url}/run/epoch=0-step=6-v1.ckpt")
    start = len(proxy.log)
    plugin.remove_checkpoint(url)
    log = proxy.log[start:]
    removals = [r for r in log if r.method in ("DELETE", "POST")]
    assert removals[0].method == "DELETE"
    assert removals[0].path.endswith(MANIFEST)
    assert _objects(bucket, "run/epoch=0-step=6.ckpt") == []
    assert MANIFEST in _objects(bucket, "run/epoch=0-step=6-v1.ckpt")  # a neighbour stays
    with pytest.raises(tk.TorchkeepFileNotFoundError, match=re.escape(url)):
        plugin.load_checkpoint(url)


def test_a_damaged_step_on_the_bucket_is_refused_naming_its_url(s3_bucket: Bucket) -> None:
    import fsspec

    url = f"{s3_bucket.url}/run/last.ckpt"
    plugin = TorchkeepCheckpointIO(storage_options=s3_bucket.storage_options)
    plugin.save_checkpoint(_checkpoint(3), url)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_bucket.storage_options)
    root = url.removeprefix("s3://")
    data = next(k for k in fs.find(root) if k.endswith(".safetensors"))
    blob = bytearray(fs.cat_file(data))
    blob[-1] ^= 0xFF
    fs.pipe_file(data, bytes(blob))
    with pytest.raises(tk.ChecksumMismatchError, match=re.escape(s3_bucket.url)):
        plugin.load_checkpoint(url)


def test_last_checkpoint_is_the_newest_committed_last_step(memory_bucket: Bucket) -> None:
    import fsspec

    run = f"{memory_bucket.url}/run"
    plugin = TorchkeepCheckpointIO()
    uncommitted = f"{run}/last.ckpt/0123456789abcdef/state.json"
    fsspec.filesystem("memory").pipe_file(uncommitted, b"{}")  # a save killed before its manifest
    plugin.save_checkpoint(_checkpoint(1), f"{run}/epoch=0-step=1.ckpt")
    assert last_checkpoint(run) is None
    plugin.save_checkpoint(_checkpoint(2), f"{run}/last-v1.ckpt")
    plugin.save_checkpoint(_checkpoint(3), f"{run}/last.ckpt")
    newest = last_checkpoint(run)
    assert newest is not None
    assert newest.endswith("/run/last.ckpt")
    plugin.save_checkpoint(_checkpoint(4), f"{run}/last-v1.ckpt")  # its manifest is now newer
    newest = last_checkpoint(run)
    assert newest is not None
    assert newest.endswith("/run/last-v1.ckpt")
    assert plugin.load_checkpoint(newest)["global_step"] == 4


def test_lightnings_own_last_lookup_still_loses_the_bucket(configured_bucket: Bucket) -> None:
    """Why last_checkpoint() exists: ModelCheckpoint lists a remote dirpath with fsspec, which
    returns names without 's3://', so Lightning's ckpt_path="last" looks them up on the local
    disk and trains from scratch (Lightning #18261). When this fails, Lightning keeps the
    scheme: check then that ckpt_path="last" works with torchkeep's folder-shaped steps (its
    fs.modified() of a prefix raises IsADirectoryError on s3fs)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    run = f"{configured_bucket.url}/run"
    TorchkeepCheckpointIO().save_checkpoint(_checkpoint(1), f"{run}/last.ckpt")
    found = ModelCheckpoint(dirpath=run)._find_last_checkpoints(None)
    assert found == {f"{run}/last.ckpt".removeprefix("s3://")}
    assert last_checkpoint(run) == f"{run}/last.ckpt"


def test_a_crashed_saves_data_is_deleted_by_a_later_save_after_the_grace(
    memory_bucket: Bucket,
) -> None:
    import fsspec

    run = f"{memory_bucket.url}/run"
    orphan = f"{run}/last.ckpt/0123456789abcdef/state.json"  # a save killed before its manifest
    fsspec.filesystem("memory").pipe_file(orphan, b"{}")
    TorchkeepCheckpointIO().save_checkpoint(_checkpoint(1), f"{run}/last.ckpt")
    assert fsspec.filesystem("memory").exists(orphan)  # within the grace: a writer may be busy
    plugin = TorchkeepCheckpointIO(transfer=tk.Transfer(orphan_grace_s=0))
    plugin.save_checkpoint(_checkpoint(2), f"{run}/last.ckpt")
    assert not fsspec.filesystem("memory").exists(orphan)
    assert plugin.load_checkpoint(f"{run}/last.ckpt")["global_step"] == 2


def test_convert_ckpt_reads_and_writes_urls(s3_bucket: Bucket, tmp_path: Path) -> None:
    opts = s3_bucket.storage_options
    source = tmp_path / "plain.ckpt"
    saved = _checkpoint(4)
    torch.save(saved, source)
    target = f"{s3_bucket.url}/run/converted.ckpt"
    assert convert_ckpt(source, target, storage_options=opts) == target
    _assert_same(TorchkeepCheckpointIO(storage_options=opts).load_checkpoint(target), saved)


def test_storage_options_with_a_local_path_are_refused(tmp_path: Path) -> None:
    with pytest.raises(tk.StorageCapabilityError, match="local path"):
        TorchkeepCheckpointIO(storage_options={"anon": True}).save_checkpoint(
            _checkpoint(1), tmp_path / "last.ckpt"
        )
    assert not (tmp_path / "last.ckpt").exists()


# ---- what cannot take a URL refuses it by name -------------------------------------------------


@needs_sharded_checkpoints
def test_the_sharded_strategy_refuses_a_url_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep.integrations.lightning_sharded import TorchkeepModelParallelStrategy

    monkeypatch.chdir(tmp_path)
    strategy = TorchkeepModelParallelStrategy()
    url = "s3://bucket/run/last.ckpt"
    for call in (
        lambda: strategy.save_checkpoint(_checkpoint(1), url),
        lambda: strategy.load_checkpoint(url),
        lambda: strategy.remove_checkpoint(url),
    ):
        with pytest.raises(tk.StorageCapabilityError, match=re.escape(url)) as raised:
            call()
        assert "CheckpointManager" in str(raised.value)  # the way out
    assert list(tmp_path.iterdir()) == []


def test_accelerate_weight_hooks_refuse_a_url_and_save_state_takes_one(
    memory_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from torchkeep.integrations.accelerate import (
        load_state,
        save_state,
        use_torchkeep_for_weights,
    )

    monkeypatch.chdir(tmp_path)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    use_torchkeep_for_weights(accelerator)
    url = f"{memory_bucket.url}/acc"
    with pytest.raises(tk.StorageCapabilityError, match=re.escape(url)):
        accelerator.save_state(url)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no weights written locally

    expected = {k: v.clone() for k, v in model.state_dict().items()}
    saved = save_state(accelerator, url, 5, model=model)
    assert isinstance(saved, str)
    assert saved.startswith("memory://")
    assert saved.endswith("/acc/step-00000005")
    with torch.no_grad():
        model.weight.zero_()
    assert load_state(accelerator, url, model=model).step == 5
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_transformers_entry_points_refuse_a_url_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from torchkeep.integrations.transformers import (
        TorchkeepSealCallback,
        TorchkeepTrainer,
        checkpoint_problems,
        last_valid_checkpoint,
    )

    monkeypatch.chdir(tmp_path)
    url = "s3://bucket/hf-run"
    args = TrainingArguments(output_dir=url, report_to=[], use_cpu=True)
    with pytest.raises(tk.StorageCapabilityError, match=re.escape(url)):
        TorchkeepTrainer(model=torch.nn.Linear(2, 2), args=args)
    with pytest.raises(tk.StorageCapabilityError, match=re.escape(url)):
        TorchkeepSealCallback().on_init_end(args, None, None)
    with pytest.raises(tk.StorageCapabilityError, match=re.escape(url)):
        last_valid_checkpoint(url)
    with pytest.raises(tk.StorageCapabilityError, match=re.escape(f"{url}/checkpoint-5")):
        checkpoint_problems(f"{url}/checkpoint-5")
    assert not (tmp_path / "s3:").exists()
