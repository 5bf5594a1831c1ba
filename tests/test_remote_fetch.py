"""What a read of a checkpoint folder or a step on object storage fetches, proven by the proxy's
request log: loading fetches the newest step only (the previous one only when the newest is
damaged, with the local reader's warning), ``ls --no-hash`` fetches no data object, ``verify``
and ``ls`` fetch one step at a time, and the files of one step are fetched concurrently within
``Transfer.max_concurrency`` in total.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from tests.remote.proxy import FaultProxy
from tests.remote.server import Bucket
from tests.test_remote_infra import raw
from tests.test_remote_io import cli, data_prefix, flip, options_flags
from torchkeep.checkpoint.remote import RemoteSteps
from torchkeep.describe import describe
from torchkeep.manifest import MANIFEST_NAME
from torchkeep.models import Net

pytest.importorskip("fsspec")

STEPS = (1, 2, 3)


def save_steps(directory: str, net: Net, **options: object) -> dict[int, dict[str, torch.Tensor]]:
    """Save steps 1..3 (model, optimizer: several files each) with different weights; return
    each step's model state."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    states = {}
    with tk.CheckpointManager(directory, keep_last=None, **options) as manager:  # type: ignore[arg-type]
        for step in STEPS:
            net(torch.randn(2, 3, 32, 32)).sum().backward()
            optimizer.step()
            manager.save(step, model=net, optimizer=optimizer)
            states[step] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return states


def object_gets(proxy: FaultProxy, since: int) -> list[str]:
    """The object keys (below the bucket) GET since log entry ``since``."""
    return [r.path.split("/", 2)[2] for r in proxy.log[since:] if r.is_object_get]


def data_gets(gets: list[str]) -> set[int]:
    """The steps whose data objects (not manifests) were read."""
    found = (re.fullmatch(r".*step-0*([0-9]+)/[0-9a-f]{16}/.+", key) for key in gets)
    return {int(match.group(1)) for match in found if match}


def test_loading_a_folder_reads_only_the_newest_step(
    s3_proxy: tuple[FaultProxy, Bucket], net: Net
) -> None:
    proxy, bucket = s3_proxy
    run = f"{bucket.url}/run"
    states = save_steps(run, net, storage_options=bucket.storage_options)
    opts = bucket.storage_options

    start = len(proxy.log)
    loaded = tk.load_state_dict(run, storage_options=opts)
    for key, value in states[3].items():
        assert torch.equal(loaded[key], value), key
    gets = object_gets(proxy, start)
    assert data_gets(gets) == {3}
    assert {g for g in gets if g.endswith(MANIFEST_NAME)} == {
        f"run/step-0000000{s}/{MANIFEST_NAME}" for s in STEPS
    }

    start = len(proxy.log)
    fresh = Net()
    assert tk.load_weights(fresh, run, storage_options=opts).ok
    assert data_gets(object_gets(proxy, start)) == {3}

    start = len(proxy.log)
    description = describe(run, storage_options=opts)
    assert [s for s, _ in description.sections["steps"]] == ["1", "2", "3"]
    assert data_gets(object_gets(proxy, start)) == {3}


def test_damaged_newest_step_falls_back_to_the_previous_one_like_a_local_folder(
    s3_proxy: tuple[FaultProxy, Bucket], net: Net, tmp_path: Path
) -> None:
    proxy, bucket = s3_proxy
    run, local_run = f"{bucket.url}/run", tmp_path / "run"
    torch.manual_seed(0)
    states = save_steps(run, net, storage_options=bucket.storage_options)
    torch.manual_seed(0)
    save_steps(str(local_run), Net())
    step3 = "run/step-00000003"
    flip(bucket, f"{step3}/{data_prefix(bucket, step3)}/model.safetensors", -1)
    local_file = local_run / "step-00000003" / "model.safetensors"
    data = bytearray(local_file.read_bytes())
    data[-1] ^= 0xFF
    local_file.write_bytes(bytes(data))

    with pytest.warns(UserWarning, match="checkpoint step 3 is unusable") as local_warnings:
        tk.load_state_dict(local_run)
    start = len(proxy.log)
    with pytest.warns(UserWarning, match="checkpoint step 3 is unusable") as remote_warnings:
        loaded = tk.load_state_dict(run, storage_options=bucket.storage_options)

    for key, value in states[2].items():
        assert torch.equal(loaded[key], value), key
    assert data_gets(object_gets(proxy, start)) == {3, 2}  # never step 1's data
    local_text = [str(w.message).replace(str(local_run), "RUN") for w in local_warnings]
    # the remote warning names the damaged object itself, under the step's save id
    data = data_prefix(bucket, step3)
    assert all(f"/{data}/" in str(w.message) for w in remote_warnings)
    remote_text = [str(w.message).replace(run, "RUN").replace(f"/{data}/", "/")
                   for w in remote_warnings]  # fmt: skip
    assert remote_text == local_text
    assert remote_text[0].startswith("checkpoint step 3 is unusable and was skipped: RUN/")


def test_ls_without_hashes_reads_no_data_object(
    s3_proxy: tuple[FaultProxy, Bucket], net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy, bucket = s3_proxy
    run = f"{bucket.url}/run"
    save_steps(run, net, storage_options=bucket.storage_options)
    step2 = f"run/step-00000002/{data_prefix(bucket, 'run/step-00000002')}"
    RemoteSteps(run, storage_options=bucket.storage_options).store.delete(
        f"{step2.removeprefix('run/')}/state.json"
    )
    flags = options_flags(bucket)  # through the proxy

    start = len(proxy.log)
    code, out, _ = cli("ls", run, "--no-hash", "--json", *flags, capsys=capsys)
    assert code == 0
    gets = object_gets(proxy, start)
    assert gets
    assert all(g.endswith(MANIFEST_NAME) for g in gets)  # manifests only
    listed = {s["step"]: s for s in json.loads(out)["steps"]}
    assert [listed[s]["valid"] for s in STEPS] == [True, False, True]
    assert listed[2]["problems"] == [f"{bucket.url}/{step2}/state.json is missing"]

    start = len(proxy.log)
    code, out, _ = cli("ls", run, "--json", *flags, capsys=capsys)
    assert code == 0
    assert data_gets(object_gets(proxy, start)) == {1, 2, 3}  # hashes need every step


def test_verify_and_ls_fetch_one_step_at_a_time(
    s3_bucket: Bucket, net: Net, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = f"{s3_bucket.url}/run"
    save_steps(run, net, storage_options=s3_bucket.storage_options)
    on_disk: list[int] = []
    fetch_files = RemoteSteps.fetch_files

    def counting(
        self: RemoteSteps, step: int, manifest: dict[str, object], local: Path
    ) -> list[str]:
        data = [p for p in local.parent.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
        on_disk.append(len(data))
        return fetch_files(self, step, manifest, local)

    monkeypatch.setattr(RemoteSteps, "fetch_files", counting)
    report = tk.verify(run, storage_options=s3_bucket.storage_options)
    assert report.ok
    assert len(report.checked) == 3
    assert on_disk == [0, 0, 0]  # the step checked before was deleted before the next came
    code, _, _ = cli("ls", run, *options_flags(s3_bucket), capsys=capsys)
    assert code == 0
    assert on_disk == [0] * 6


def test_files_of_a_step_are_fetched_concurrently_within_max_concurrency(
    s3_proxy: tuple[FaultProxy, Bucket], net: Net
) -> None:
    proxy, bucket = s3_proxy
    run = f"{bucket.url}/run"
    save_steps(run, net, storage_options=bucket.storage_options)
    files = RemoteSteps(run, storage_options=bucket.storage_options).committed()[-1]
    assert len(files.manifest["files"]) >= 3
    # each data GET waits (up to 20 s) until a second one has arrived: one after another
    # would wait 20 s and never have two in flight
    hold = proxy.add("hold", method="GET", path=r"step-00000003/[0-9a-f]{16}/", seconds=20)
    transfer = tk.Transfer(max_concurrency=2, deadline_s=120)
    tk.load_state_dict(run, storage_options=bucket.storage_options, transfer=transfer)
    assert hold.fired >= 3
    assert proxy.max_objects_read_at_once == 2  # different files at once, never more than 2


def test_a_step_url_is_fetched_concurrently_too(
    s3_proxy: tuple[FaultProxy, Bucket], net: Net
) -> None:
    proxy, bucket = s3_proxy
    run = f"{bucket.url}/run"
    save_steps(run, net, storage_options=bucket.storage_options)
    proxy.add("hold", method="GET", path=r"step-00000002/[0-9a-f]{16}/", seconds=20)
    report = tk.verify(f"{run}/step-00000002", storage_options=bucket.storage_options)
    assert report.ok
    assert proxy.max_objects_read_at_once >= 2


def test_stalled_read_ends_at_the_deadline_of_the_whole_fetch(
    s3_proxy: tuple[FaultProxy, Bucket], net: Net
) -> None:
    proxy, bucket = s3_proxy
    run = f"{bucket.url}/run"
    save_steps(run, net, storage_options=bucket.storage_options)
    proxy.add("stall", method="GET", path=r"step-00000003/[0-9a-f]{16}/", seconds=60)
    options = {**bucket.storage_options, "config_kwargs": {"read_timeout": 600}}
    with pytest.raises(tk.RemoteStorageError, match="deadline"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tk.load_state_dict(run, storage_options=options, transfer=tk.Transfer(deadline_s=3))


def test_proxy_hold_releases_gets_only_together(s3_proxy: tuple[FaultProxy, Bucket]) -> None:
    """The ``hold`` fault itself: a lone GET waits (and then passes), two concurrent GETs of
    different objects pass together and are counted as read at once (a dud would let the
    concurrency test above pass vacuously)."""
    proxy, bucket = s3_proxy
    name = bucket.url.removeprefix("s3://")
    lone = proxy.add("hold", method="GET", path="/lone$", count=2, seconds=0.2, times=1)
    assert raw(proxy.endpoint, "GET", f"/{name}/lone")[0] == 404  # held, then forwarded
    assert (lone.fired, proxy.max_objects_read_at_once) == (1, 1)
    proxy.add("hold", method="GET", path="/pair-", count=2, seconds=600)
    threads = [
        threading.Thread(target=raw, args=(proxy.endpoint, "GET", f"/{name}/pair-{i}"))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status for r in proxy.log[-2:]] == [404, 404]
    assert proxy.max_objects_read_at_once == 2


def test_truncated_multi_range_object_is_damage_not_a_storage_error(s3_bucket: Bucket) -> None:
    """A step's data object shorter than its manifest says, read in several ranges, is a damaged
    step (the local size check names it; the previous step is loaded), not a read past the
    object's end refused by the store."""
    run, opts = f"{s3_bucket.url}/run", s3_bucket.storage_options
    transfer = tk.Transfer(part_size=5 << 20, deadline_s=120)
    layer = torch.nn.Linear(1200, 1200, bias=False)  # 5.8 MB: two ranges of 5 MiB
    with tk.CheckpointManager(run, storage_options=opts, transfer=transfer) as manager:
        manager.save(1, model=layer)
        older = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight.add_(1)
        manager.save(2, model=layer)
    key = f"run/step-00000002/{data_prefix(s3_bucket, 'run/step-00000002')}/model.safetensors"
    store = RemoteSteps(run, storage_options=opts).store
    head = store.read(key.removeprefix("run/"), start=0, end=1 << 20)
    store.write(key.removeprefix("run/"), head)
    with pytest.warns(UserWarning, match="checkpoint step 2 is unusable") as caught:
        loaded = tk.load_state_dict(run, storage_options=opts, transfer=transfer)
    assert torch.equal(loaded["weight"], older)
    message = str(caught[0].message)
    assert f"{s3_bucket.url}/{key} is missing or has another size" in message
