"""Folders copied between a bucket and a disk, as users copy them (``aws s3 sync``,
``gsutil rsync``, ``fsspec get/put(recursive=True)``).

On object storage a step (or bundle) keeps its files under a per-save id named by its
manifest's ``data`` field (``step-00000003/<16 hex>/model.safetensors``); a copy on disk keeps
that layout, and every local reader finds the files there (:func:`torchkeep.manifest.
files_folder`). The reverse: a local folder uploaded as it is has manifests without ``data``,
its files next to the manifest, and the remote readers read it, retention deletes it, the
debris cleanup never touches it. Real moto S3 round trips both ways; the round trips failed
before the readers honoured ``data`` (the schema and planted-package tests guard what held).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests import _dist_harness as harness
from tests._compat import needs_sharded_checkpoints
from tests._live import prove_live
from tests.conftest import assert_state_equal
from tests.remote.server import Bucket
from torchkeep.cli import main

fsspec = pytest.importorskip("fsspec")


def _filesystem(bucket: Bucket) -> Any:
    protocol = bucket.url.split("://", 1)[0]
    return fsspec.filesystem(protocol, **bucket.storage_options)


def _get(bucket: Bucket, name: str, local: Path) -> Path:
    """``fsspec get(recursive=True)`` of ``<bucket>/<name>`` into the new folder ``local``."""
    fs = _filesystem(bucket)
    fs.get(f"{bucket.url}/{name}/", f"{local}/", recursive=True)
    return local


def _put(local: Path, bucket: Bucket, name: str) -> str:
    """``fsspec put(recursive=True)`` of the folder ``local`` to ``<bucket>/<name>``."""
    fs = _filesystem(bucket)
    fs.put(f"{local}/", f"{bucket.url}/{name}/", recursive=True)
    return f"{bucket.url}/{name}"


def _data_folder(step: Path) -> Path:
    data = json.loads((step / "manifest.json").read_text())["data"]
    return step / data


def _training(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    model, optimizer = _training(99)
    return model, optimizer


Saved = dict[int, dict[str, Any]]


@pytest.fixture
def synced(s3_bucket: Bucket, tmp_path: Path) -> tuple[Path, Saved]:
    """Steps 1, 2, 3 saved on a moto S3 bucket, then copied to disk with fsspec get; with the
    model and optimizer states each step holds."""
    saved: Saved = {}
    with tk.CheckpointManager(
        f"{s3_bucket.url}/run1", keep_last=None, storage_options=s3_bucket.storage_options
    ) as mgr:
        for step in (1, 2, 3):
            model, optimizer = _training(step)
            mgr.save(step, model=model, optimizer=optimizer, epoch=step)
            saved[step] = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
            }
    return _get(s3_bucket, "run1", tmp_path / "run1"), saved


def _assert_restored(model: nn.Module, optimizer: torch.optim.Optimizer, saved: Any) -> None:
    assert_state_equal(model.state_dict(), saved["model"])
    restored = optimizer.state_dict()["state"]
    for key, values in saved["optimizer"]["state"].items():
        assert_state_equal(restored[key], values)


# ---- a bucket folder copied to disk ---------------------------------------------------------


def test_a_synced_checkpoint_folder_restores_bit_exact(synced: tuple[Path, Saved]) -> None:
    folder, saved = synced
    assert _data_folder(folder / "step-00000003").is_dir()  # the bucket's layout, kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no step is called damaged
        mgr = tk.CheckpointManager(folder)
        assert mgr.steps == [1, 2, 3]
        assert mgr.latest_step == 3
        model, optimizer = _fresh()
        restored = mgr.restore(model=model, optimizer=optimizer)
    assert (restored.step, restored.extra["epoch"]) == (3, 3)
    _assert_restored(model, optimizer, saved[3])
    model, optimizer = _fresh()
    assert mgr.restore(2, model=model, optimizer=optimizer).step == 2
    _assert_restored(model, optimizer, saved[2])


def test_a_synced_folder_loads_verifies_exports_and_converts(
    synced: tuple[Path, Saved], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, saved = synced
    step = folder / "step-00000003"
    assert_state_equal(tk.load_state_dict(step), saved[3]["model"])
    assert_state_equal(tk.load_state_dict(folder), saved[3]["model"])
    report = tk.verify(folder)
    assert report.ok, report.problems
    assert len(report.checked) == 3
    exported = tk.CheckpointManager(folder).export_torch(2, tmp_path / "w.pt")
    assert_state_equal(torch.load(exported, weights_only=True)["model_state_dict"],
                       saved[2]["model"])  # fmt: skip
    assert main(["ls", str(folder)]) == 0
    listing = capsys.readouterr().out
    assert "NO" not in listing, listing
    assert main(["verify", str(folder)]) == 0
    assert main(["inspect", str(step)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    # convert writes a step into the synced folder, replacing step 2 and its data folder
    assert main(["convert", str(exported), str(folder), "--force"]) == 0
    step2 = folder / "step-00000002"
    assert not any(p.is_dir() for p in step2.iterdir())
    assert_state_equal(tk.load_state_dict(step2), saved[2]["model"])
    assert tk.verify(folder).ok


def test_retention_and_overwrite_in_a_synced_folder(synced: tuple[Path, Saved]) -> None:
    folder, _ = synced
    data_of_1 = _data_folder(folder / "step-00000001")
    with tk.CheckpointManager(folder, keep_last=2) as mgr:
        model, optimizer = _training(4)
        mgr.save(4, model=model, optimizer=optimizer)
        assert mgr.steps == [3, 4]
        model, optimizer = _training(33)
        mgr.save(3, model=model, optimizer=optimizer, overwrite=True)
        replaced = model.state_dict()
    assert not data_of_1.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000003", "step-00000004"]
    assert not any(p.is_dir() for p in (folder / "step-00000003").iterdir())  # a local save
    model, optimizer = _fresh()
    assert tk.CheckpointManager(folder).restore(3, model=model, optimizer=optimizer).step == 3
    assert_state_equal(model.state_dict(), replaced)


def test_a_damaged_synced_step_falls_back(synced: tuple[Path, Saved]) -> None:
    folder, saved = synced
    weights = _data_folder(folder / "step-00000003") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    model, optimizer = _fresh()
    with pytest.warns(UserWarning, match=r"step 3 is unusable.*does not match"):
        assert tk.CheckpointManager(folder).restore(model=model, optimizer=optimizer).step == 2
    _assert_restored(model, optimizer, saved[2])
    report = tk.verify(folder)
    assert [p for p in report.problems if "model.safetensors" in p], report.problems


def test_uploads_that_never_committed_are_ignored_and_unlisted_files_reported(
    synced: tuple[Path, Saved],
) -> None:
    folder, _ = synced
    step = folder / "step-00000003"
    orphan = step / "0123456789abcdef"  # a save that crashed mid-upload, synced along
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half an upload")
    report = tk.verify(step)
    assert report.ok, report.problems
    model, optimizer = _fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tk.CheckpointManager(folder).restore(model=model, optimizer=optimizer).step == 3
    (_data_folder(step) / "notes.txt").write_text("added later")
    (step / "stray.bin").write_bytes(b"x")
    problems = tk.verify(step).problems
    assert any("notes.txt is not listed" in p for p in problems), problems
    assert any("stray.bin is not listed" in p for p in problems), problems
    assert not any("0123456789abcdef" in p for p in problems), problems


# ---- a data field naming something else -------------------------------------------------


def _replace_data_folder(step: Path, how: str, tmp_path: Path) -> Path:
    """Make the step's data folder a link to a copy outside, a file, or nothing."""
    data = _data_folder(step)
    outside = tmp_path / "outside"
    shutil.move(data, outside)
    if how == "link":
        data.symlink_to(outside, target_is_directory=True)
    elif how == "file":
        data.write_bytes(b"not a folder")
    return outside


@pytest.mark.parametrize(
    ("how", "message"),
    [("link", "is a symbolic link"), ("file", "is not a folder"), ("missing", "is missing")],
)
def test_a_data_folder_that_is_not_a_folder_inside_the_step_is_refused(
    synced: tuple[Path, Saved], tmp_path: Path, how: str, message: str
) -> None:
    folder, saved = synced
    step = folder / "step-00000003"
    outside = _replace_data_folder(step, how, tmp_path)
    if how == "link":  # the escape is live: plain path lookups land outside the step
        assert (step / outside.name).exists() is False
        assert (_data_folder(step) / "state.json").resolve().parent == outside.resolve()
    with pytest.raises(tk.CorruptFileError, match=message) as info:
        tk.load_state_dict(step)
    assert "step-00000003" in str(info.value)
    assert any(word in str(info.value) for word in ("Copy the whole folder", "Replace the link"))
    problems = tk.verify(step).problems
    assert any(message in p for p in problems), problems
    model, optimizer = _fresh()
    with pytest.warns(UserWarning, match=rf"step 3 is unusable.*{message}"):
        assert tk.CheckpointManager(folder).restore(model=model, optimizer=optimizer).step == 2
    _assert_restored(model, optimizer, saved[2])
    if how == "link":  # retention deletes the link, never what it points to
        with tk.CheckpointManager(folder, keep_last=1) as mgr:
            mgr.save(9, model=nn.Linear(2, 2))
        assert not step.exists()
        assert (outside / "state.json").is_file()


@pytest.mark.parametrize("data", ["../step-00000002", "/etc", "0123456789ABCDEF", "x" * 16, ""])
def test_a_data_field_that_is_no_save_id_is_refused_by_the_schema(
    synced: tuple[Path, Saved], data: str
) -> None:
    """No path traversal: the schema lets through 16 lowercase hex digits only, so the data
    folder is always a direct child of the step."""
    folder, _ = synced
    step = folder / "step-00000003"
    manifest = json.loads((step / "manifest.json").read_text())
    (step / "manifest.json").write_text(json.dumps({**manifest, "data": data}))
    with pytest.raises(tk.InvalidDocumentError, match="data"):
        tk.load_state_dict(step)
    assert tk.CheckpointManager(folder).steps == [1, 2]


# ---- bundles -------------------------------------------------------------------------------

_ARGS = {"in_features": 3, "out_features": 2}


def _options(bucket: Bucket) -> dict[str, Any]:
    return {"storage_options": bucket.storage_options}


def test_a_synced_bundle_loads_verifies_and_describes(
    s3_bucket: Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(3)
    net = nn.Linear(3, 2)
    tk.save_model(net, f"{s3_bucket.url}/net.bundle", init_args=_ARGS, **_options(s3_bucket))
    bundle = _get(s3_bucket, "net.bundle", tmp_path / "net.bundle")
    assert _data_folder(bundle).is_dir()
    loaded = tk.load_model(bundle)
    assert_state_equal(loaded.state_dict(), net.state_dict())
    assert_state_equal(tk.load_state_dict(bundle), net.state_dict())
    assert tk.verify(bundle).ok, tk.verify(bundle).problems
    assert main(["inspect", str(bundle)]) == 0
    assert "unsafe" not in capsys.readouterr().out
    assert main(["verify", str(bundle)]) == 0


def test_a_package_planted_next_to_a_synced_bundles_data_is_never_imported(
    s3_bucket: Bucket, tmp_path: Path
) -> None:
    """A folder named like a save id is a valid Python package name; one holding code is
    refused like any unlisted entry, before the bundle's class is imported."""
    tk.save_model(nn.Linear(3, 2), f"{s3_bucket.url}/b", init_args=_ARGS, **_options(s3_bucket))
    bundle = _get(s3_bucket, "b", tmp_path / "b")
    canary = tmp_path / "canary"
    package = bundle / "abcdefabcdefabcd"
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(canary)!r}, 'w').close()\n")
    prove_live("import abcdefabcdefabcd", canary, cwd=bundle)
    config = _data_folder(bundle) / "config.json"
    document = json.loads(config.read_text())
    document["class"] = "abcdefabcdefabcd.Net"
    config.write_text(json.dumps(document))
    with pytest.raises(tk.TorchkeepError):
        tk.load_model(bundle)
    assert not canary.exists()
    problems = tk.verify(bundle).problems
    assert any("abcdefabcdefabcd is a folder" in p for p in problems), problems


def test_a_synced_bundles_data_folder_linked_out_is_refused(
    s3_bucket: Bucket, tmp_path: Path
) -> None:
    tk.save_model(nn.Linear(3, 2), f"{s3_bucket.url}/b", init_args=_ARGS, **_options(s3_bucket))
    bundle = _get(s3_bucket, "b", tmp_path / "b")
    _replace_data_folder(bundle, "link", tmp_path)
    with pytest.raises(tk.CorruptFileError, match="is a symbolic link"):
        tk.load_model(bundle)
    assert any("symbolic link" in p for p in tk.verify(bundle).problems)


# ---- sharded steps -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A gloo process group of world size 1, rendezvous through a file."""
    pytest.importorskip("torch.distributed")
    with harness.one_rank_group(tmp_path_factory.mktemp("synced-dist")):
        yield


@needs_sharded_checkpoints
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_synced_sharded_step_restores_distributed_and_in_one_process(
    group: None, s3_bucket: Bucket, tmp_path: Path
) -> None:
    model, optimizer = _training(5)
    url = f"{s3_bucket.url}/dist"
    with tk.CheckpointManager(
        url, distributed=True, storage_options=s3_bucket.storage_options
    ) as mgr:
        mgr.save(5, model=model, optimizer=optimizer)
    folder = _get(s3_bucket, "dist", tmp_path / "dist")
    step = folder / "step-00000005"
    assert json.loads((step / "manifest.json").read_text())["layout"] == "sharded-v1"
    assert _data_folder(step).is_dir()
    fresh, fresh_optimizer = _fresh()
    with tk.CheckpointManager(folder, distributed=True) as local:
        assert local.restore(model=fresh, optimizer=fresh_optimizer).step == 5
    assert_state_equal(fresh.state_dict(), model.state_dict())
    fresh, fresh_optimizer = _fresh()
    assert tk.CheckpointManager(folder).restore(model=fresh, optimizer=fresh_optimizer).step == 5
    assert_state_equal(fresh.state_dict(), model.state_dict())
    assert_state_equal(tk.load_state_dict(step), model.state_dict())
    assert tk.verify(folder).ok, tk.verify(folder).problems
    assert main(["inspect", str(step)]) == 0
    assert main(["convert", str(step), str(tmp_path / "w.safetensors")]) == 0
    consolidated = tk.load_state_dict(tmp_path / "w.safetensors")
    weights = {k.removeprefix("model/"): v for k, v in consolidated.items() if "model/" in k}
    assert_state_equal(weights, model.state_dict())


# ---- a local folder copied to a bucket -------------------------------------------------------


def test_an_uploaded_local_folder_is_read_on_the_bucket(
    s3_bucket: Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    states = {}
    with tk.CheckpointManager(tmp_path / "ckpt", keep_last=None) as local:
        for step in (1, 2):
            model, optimizer = _training(step)
            local.save(step, model=model, optimizer=optimizer)
            states[step] = model.state_dict()
    url = _put(tmp_path / "ckpt", s3_bucket, "ckpt")
    options = s3_bucket.storage_options
    mgr = tk.CheckpointManager(url, keep_last=None, storage_options=options)
    assert mgr.steps == [1, 2]
    model, optimizer = _fresh()
    assert mgr.restore(model=model, optimizer=optimizer).step == 2
    assert_state_equal(model.state_dict(), states[2])
    assert_state_equal(tk.load_state_dict(f"{url}/step-00000001", storage_options=options),
                       states[1])  # fmt: skip
    assert tk.verify(url, storage_options=options).ok
    endpoint = options["client_kwargs"]["endpoint_url"]
    cli = [*("--storage-option", f"endpoint_url={endpoint}"),
           *("--storage-option", "key=testing", "--storage-option", "secret=testing")]  # fmt: skip
    assert main(["ls", url, *cli]) == 0
    assert "NO" not in capsys.readouterr().out
    assert main(["verify", url, *cli]) == 0


def _list_extra_file(step: Path, name: str, data: bytes) -> None:
    """Add the file ``name`` to the committed local ``step``, listed in its manifest."""
    from torchkeep.hashing import hash_file

    (step / name).write_bytes(data)
    manifest = json.loads((step / "manifest.json").read_text())
    size, digest = hash_file(step / name)
    manifest["files"][name] = {"size": size, "hash": digest}
    (step / "manifest.json").write_text(json.dumps(manifest))


def test_retention_and_cleanup_on_the_bucket_of_an_uploaded_folder(
    s3_bucket: Bucket, tmp_path: Path
) -> None:
    from torchkeep.checkpoint.remote import RemoteSteps

    with tk.CheckpointManager(tmp_path / "ckpt", keep_last=None) as local:
        for step in (1, 2):
            local.save(step, model=_training(step)[0])
    # a listed file named like a save id, and a crashed save's object below that name
    step2 = tmp_path / "ckpt" / "step-00000002"
    _list_extra_file(step2, "0123456789abcdef", b"listed")
    assert tk.verify(step2).ok
    url = _put(tmp_path / "ckpt", s3_bucket, "ckpt")
    options = s3_bucket.storage_options
    fs = _filesystem(s3_bucket)
    fs.pipe(f"{url}/step-00000002/0123456789abcdef/model.safetensors", b"orphan")
    fs.pipe(f"{url}/step-00000002/fedcba9876543210/model.safetensors", b"orphan")
    remote = RemoteSteps(url, storage_options=options, transfer=tk.Transfer(orphan_grace_s=0))
    removed = remote.clean_orphans(remote.committed())
    assert removed == [f"{url}/step-00000002/fedcba9876543210"]
    fs.invalidate_cache()
    assert fs.cat(f"{url}/step-00000002/0123456789abcdef") == b"listed"
    assert tk.verify(url, storage_options=options).ok
    with tk.CheckpointManager(url, keep_last=1, storage_options=options) as mgr:
        mgr.save(3, model=_training(3)[0])
        assert mgr.steps == [3]
    fs.invalidate_cache()
    assert fs.find(f"{url}/step-00000001") == []
    assert fs.find(f"{url}/step-00000002") == []


def test_overwriting_an_uploaded_step_on_the_bucket_removes_its_old_files(
    s3_bucket: Bucket, tmp_path: Path
) -> None:
    with tk.CheckpointManager(tmp_path / "ckpt") as local:
        local.save(1, model=_training(1)[0])
    url = _put(tmp_path / "ckpt", s3_bucket, "ckpt")
    options = s3_bucket.storage_options
    model = _training(7)[0]
    with tk.CheckpointManager(url, storage_options=options) as mgr:
        mgr.save(1, model=model, overwrite=True)
    fs = _filesystem(s3_bucket)
    fs.invalidate_cache()
    names = sorted(key.rsplit("/", 2)[-2:][-1] for key in fs.find(f"{url}/step-00000001"))
    loose = [k for k in fs.find(f"{url}/step-00000001") if k.count("/") == 3]
    assert [k.rsplit("/", 1)[1] for k in loose] == ["manifest.json"], names
    fresh = _training(99)[0]
    assert tk.CheckpointManager(url, storage_options=options).restore(model=fresh).step == 1
    assert_state_equal(fresh.state_dict(), model.state_dict())
