"""CheckpointManager on S3 through a fault-injecting proxy (issue 13): lost answers, throttling,
refusals, stalls, the order of retention's deletes, parallel part uploads, async failures."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.remote.proxy import FaultProxy
from tests.remote.server import Bucket

pytest.importorskip("s3fs")

Proxied = tuple[FaultProxy, Bucket]


def _model(seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(width, width)


def _manager(bucket: Bucket, **kwargs: Any) -> tk.CheckpointManager:
    return tk.CheckpointManager(
        f"{bucket.url}/run", storage_options=bucket.storage_options, **kwargs
    )


def _restores(bucket: Bucket, step: int, model: nn.Module) -> bool:
    target = nn.Linear(
        model.in_features,  # type: ignore[arg-type]
        model.out_features,  # type: ignore[arg-type]
        bias=model.bias is not None,
    )
    _manager(bucket).restore(step, model=target)
    return all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), target.state_dict().values(), strict=True)
    )


def test_lost_answer_to_the_manifest_create_is_a_success(s3_proxy: Proxied) -> None:
    proxy, bucket = s3_proxy
    lost = proxy.add("lose", method="PUT", path=r"manifest\.json$", times=1)
    model = _model(1)
    _manager(bucket).save(1, model=model)
    assert lost.fired == 1  # the manifest was created, then its answer lost
    manifest_puts = proxy.requests(method="PUT", path=r"manifest\.json$")
    assert [r.status for r in manifest_puts] == [500, 412]  # the retry found our own manifest
    assert _manager(bucket).steps == [1]
    assert _restores(bucket, 1, model)


def test_throttling_on_every_third_request_is_retried(s3_proxy: Proxied) -> None:
    proxy, bucket = s3_proxy
    throttle = proxy.add("slowdown", every=3)
    model = _model(2)
    mgr = _manager(bucket, keep_last=1)
    mgr.save(1, model=model)
    mgr.save(2, model=model)
    assert throttle.fired >= 3
    proxy.clear()
    assert mgr.steps == [2]
    assert _restores(bucket, 2, model)


def test_permanent_refusal_raises_remote_storage_error_and_commits_nothing(
    s3_proxy: Proxied,
) -> None:
    proxy, bucket = s3_proxy
    proxy.add("forbid", method="PUT")
    mgr = _manager(bucket, transfer=tk.Transfer(deadline_s=30))
    with pytest.raises(tk.RemoteStorageError) as caught:
        mgr.save(1, model=_model(3))
    error = caught.value
    assert error.status == "403"
    assert error.attempts == 1  # a refusal is final: not retried
    assert error.url.startswith(f"{bucket.url}/run/step-00000001/")
    assert error.operation in str(error)
    assert "403" in str(error)
    proxy.clear()
    assert mgr.steps == []
    assert not proxy.requests(method="PUT", path=r"manifest\.json$")


def test_stalled_upload_fails_at_the_deadline(s3_proxy: Proxied) -> None:
    proxy, bucket = s3_proxy
    stall_s = 60.0
    proxy.add("stall", method="PUT", seconds=stall_s, times=1)
    patient_client = {**bucket.storage_options, "config_kwargs": {"read_timeout": 600}}
    mgr = tk.CheckpointManager(
        f"{bucket.url}/run",
        storage_options=patient_client,  # botocore would wait; torchkeep's deadline must not
        transfer=tk.Transfer(deadline_s=2.0, retries=1),
    )
    started = time.monotonic()
    with pytest.raises(tk.RemoteStorageError, match="deadline"):
        mgr.save(1, model=_model(4))
    assert time.monotonic() - started < stall_s / 2  # bounded by the deadline, not the stall
    proxy.clear()
    assert mgr.steps == []


def test_a_manifest_create_cut_off_by_the_deadline_says_the_step_may_still_appear(
    s3_proxy: Proxied,
) -> None:
    proxy, bucket = s3_proxy
    stall_s = 6.0
    proxy.add("stall", method="PUT", path=r"manifest\.json$", seconds=stall_s, times=1)
    patient_client = {**bucket.storage_options, "config_kwargs": {"read_timeout": 600}}
    mgr = tk.CheckpointManager(
        f"{bucket.url}/run",
        storage_options=patient_client,
        transfer=tk.Transfer(deadline_s=3.0, retries=1),
    )
    model = _model(8)
    with pytest.raises(tk.RemoteStorageError, match="deadline") as caught:
        mgr.save(1, model=model)
    message = str(caught.value)
    assert "may still reach the server" in message
    assert f"{bucket.url}/run/step-00000001" in message
    assert caught.value.attempts >= 1
    # the held create is forwarded when the stall ends: the step appears, whole and verified
    appeared: list[int] = []
    for _ in range(60):
        appeared = mgr.steps
        if appeared:
            break
        time.sleep(0.25)
    proxy.clear()
    assert appeared == [1]
    assert tk.verify(f"{bucket.url}/run", storage_options=bucket.storage_options).ok
    fresh = _model(9)
    mgr.restore(model=fresh)
    assert torch.equal(fresh.weight, model.weight)


def test_a_refused_manifest_create_does_not_say_the_step_may_appear(s3_proxy: Proxied) -> None:
    proxy, bucket = s3_proxy
    proxy.add("forbid", method="PUT", path=r"manifest\.json$")
    mgr = _manager(bucket)
    with pytest.raises(tk.RemoteStorageError) as caught:
        mgr.save(1, model=_model(10))
    proxy.clear()
    assert caught.value.status == "403"
    assert "may still reach the server" not in str(caught.value)
    assert mgr.steps == []


def test_retention_deletes_the_manifest_before_the_data(s3_proxy: Proxied) -> None:
    proxy, bucket = s3_proxy
    mgr = _manager(bucket, keep_last=1)
    model = _model(5)
    mgr.save(1, model=model)
    first = len(proxy.log)
    mgr.save(2, model=model)
    log = proxy.log[first:]
    manifest_delete = [
        i
        for i, r in enumerate(log)
        if r.method == "DELETE" and r.path.endswith("step-00000001/manifest.json")
    ]
    data_deletes = [
        i
        for i, r in enumerate(log)
        if (r.method == "POST" and "delete" in r.query)
        or (r.method == "DELETE" and "step-00000001/" in r.path and "manifest" not in r.path)
    ]
    assert len(manifest_delete) == 1
    assert data_deletes
    assert manifest_delete[0] < min(data_deletes)
    committed = [
        i for i, r in enumerate(log) if r.method == "PUT" and "step-00000002/manifest" in r.path
    ]
    assert committed[0] < manifest_delete[0]  # the new step is committed before anything goes
    assert mgr.steps == [2]


def test_large_tensor_file_uploads_parts_in_parallel(s3_proxy: Proxied) -> None:
    proxy, bucket = s3_proxy
    big = nn.Linear(4096, 4096, bias=False)  # 64 MiB of float32
    transfer = tk.Transfer(part_size=8 << 20, max_concurrency=4)
    _manager(bucket, transfer=transfer, save_rng=False).save(1, model=big)
    parts = [r for r in proxy.log if r.is_upload_part]
    assert len(parts) == 9  # 64 MiB of tensor plus the safetensors header
    assert proxy.max_parts_in_flight >= 2
    assert proxy.max_parts_in_flight <= 4  # memory: at most max_concurrency parts held
    assert _restores(bucket, 1, big)


def test_async_save_failure_surfaces_at_the_next_save(s3_proxy: Proxied) -> None:
    proxy, bucket = s3_proxy
    mgr = _manager(bucket, async_save=True, transfer=tk.Transfer(deadline_s=30))
    model = _model(6)
    proxy.add("forbid", method="PUT", path=r"step-00000001/")
    mgr.save(1, model=model)  # returns once the tensors are copied
    with pytest.raises(tk.RemoteStorageError, match="403"):
        mgr.save(2, model=model)
    proxy.clear()
    mgr.save(2, model=model)
    mgr.wait()
    assert mgr.steps == [2]
    assert _restores(bucket, 2, model)


def test_sigkilled_saves_never_leave_a_listed_step_that_fails_verification(
    s3_bucket: Bucket, moto_endpoint: str
) -> None:
    import os
    import random
    import subprocess
    import sys
    from pathlib import Path

    from torchkeep.checkpoint.remote import RemoteSteps

    url = f"{s3_bucket.url}/run"
    root = Path(__file__).resolve().parent.parent
    library = Path(tk.__file__).resolve().parents[1]  # the copy under test (mutants use one)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{library}:{root}"}
    worker = subprocess.Popen(
        [sys.executable, str(root / "tests" / "_remote_crash_worker.py"), url, moto_endpoint],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert worker.stdin is not None
    assert worker.stdout is not None

    def trial(step: int, delay: float) -> tuple[str, float]:
        worker.stdin.write(f"{step} {delay}\n")  # type: ignore[union-attr]
        worker.stdin.flush()  # type: ignore[union-attr]
        answer = worker.stdout.readline().split()  # type: ignore[union-attr]
        assert answer[0] == str(step), answer
        return answer[1], float(answer[2])

    steps = RemoteSteps(url, storage_options=s3_bucket.storage_options)
    try:
        outcome, whole = trial(1, 120.0)  # one undisturbed save: how long a save takes here
        assert outcome == "committed"
        rng = random.Random(13)
        outcomes = []
        trials = 22
        for i in range(trials):  # kill moments spread evenly over the whole save and after
            step = i + 2
            outcome, took = trial(step, whole * 1.4 * (i + rng.random()) / trials)
            outcomes.append(outcome)
            if outcome == "committed":
                whole = max(whole, took)  # saves slow down as the bucket fills: follow them
            listed = [info.step for info in steps.committed()]
            if outcome == "committed":
                assert step in listed
            for number in listed:  # every byte of every listed step verifies
                loaded = steps.read(number)
                assert loaded.entries["marker"] == ("value", number)
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)
        worker.stdout.close()
    assert outcomes.count("killed") >= 1


def test_listing_is_one_paginated_list_and_one_get_per_manifest(s3_proxy: Proxied) -> None:
    proxy, bucket = s3_proxy
    mgr = _manager(bucket, keep_last=None)
    for step in (1, 2, 3):
        mgr.save(step, model=_model(7))
    first = len(proxy.log)
    assert mgr.steps == [1, 2, 3]
    log = proxy.log[first:]
    assert len([r for r in log if "list-type" in r.query]) == 1
    assert sorted(
        r.path.rsplit("/", 2)[1] for r in log if r.method == "GET" and "list-type" not in r.query
    ) == [
        "step-00000001",
        "step-00000002",
        "step-00000003",
    ]
    assert not [r for r in log if r.method == "HEAD"]
