"""Sharded (distributed) steps on object storage: 4 gloo ranks (FSDP2 + AdamW) save to a moto
bucket through the fault proxy, restored on 4, on 2 (resharded, ranged reads only) and in one
process without a group; a rank failing mid-upload, a flipped byte, retention order, the CLI;
steps saved by one process restored on 2 ranks.

Few spawned jobs (the 4-rank one saves, fails, restores and falls back; 2-rank ones restore
resharded, restore single-process steps, and lose their coordinator mid-upload), so the file
stays within about two minutes on two busy cores."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import torchkeep as tk
from tests import _dist_harness as harness
from tests import _remote_sharded_workers as workers
from tests._compat import needs_sharded_checkpoints
from tests.remote.proxy import FaultProxy, fault_proxy
from tests.remote.server import Bucket, create_bucket, s3_options
from torchkeep.cli import main

pytestmark = [
    needs_sharded_checkpoints,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]
MODULE = "tests._remote_sharded_workers"
DEADLINE = 150.0


class Saved:
    """The bucket, its proxy, the references' folder and what each saving rank reported."""

    def __init__(self, proxy: FaultProxy, url: str, options: dict[str, Any], out: Path) -> None:
        self.proxy, self.url, self.options, self.out = proxy, url, options, out
        self.results: dict[int, Any] = {}

    def ctx(self, **more: Any) -> dict[str, Any]:
        return {"url": self.url, "options": self.options, "out": str(self.out), **more}

    def keys(self, prefix: str) -> list[str]:
        """Every key below ``prefix`` of the bucket, listed fresh (not through the proxy)."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.options)
        fs.invalidate_cache()
        base = f"{self.url.removeprefix('s3://')}/{prefix}"
        return sorted(key[len(base) + 1 :] for key in fs.find(base))


@pytest.fixture(scope="module")
def saved(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    """4 FSDP2 ranks save steps 3 and 5 (a step 4 fails on rank 2), retention, async."""
    bucket = create_bucket(moto_endpoint)
    with fault_proxy(moto_endpoint) as proxy:
        state = Saved(
            proxy, f"s3://{bucket}", s3_options(proxy.endpoint), tmp_path_factory.mktemp("rs")
        )
        outcome = harness.run("save", 4, state.ctx(), deadline=DEADLINE, module=MODULE)
        state.results = outcome.ok()
        yield state


def test_four_ranks_save_a_sharded_step_under_its_save_id(saved: Saved) -> None:
    for rank, report in saved.results.items():
        assert report["returned"] == f"{saved.url}/run/step-00000003", rank
        assert report["steps_after_fail"] == [3], rank
    keys = saved.keys("run/step-00000005")
    assert "manifest.json" in keys
    data = {key.split("/")[0] for key in keys if key != "manifest.json"}
    assert len(data) == 1
    assert re.fullmatch("[0-9a-f]{16}", data.pop())
    assert sorted(key.split("/", 1)[1] for key in keys if key != "manifest.json") == [
        "shard-00000-of-00004.safetensors",
        "shard-00001-of-00004.safetensors",
        "shard-00002-of-00004.safetensors",
        "shard-00003-of-00004.safetensors",
        "state.json",
    ]


def test_a_rank_failing_mid_upload_raises_on_every_rank_and_commits_nothing(saved: Saved) -> None:
    for rank, report in saved.results.items():
        kind, failed, message = report["fail"]
        assert kind == "DistributedCheckpointError", (rank, message)
        assert 2 in failed, (rank, message)
        assert "injected upload failure of rank 2" in message
    assert not [key for key in saved.keys("run/step-00000004") if key.endswith("manifest.json")]
    # the coordinator deleted what the other ranks had uploaded
    assert saved.keys("run/step-00000004") == []
    manifests = [r for r in saved.proxy.requests("PUT", "/run/step-00000004/manifest.json$")]
    assert manifests == []


def test_an_async_save_failing_on_one_rank_raises_at_the_next_save_on_every_rank(
    saved: Saved,
) -> None:
    for rank, report in saved.results.items():
        assert report["async_error"] == [1], rank
        assert report["async_steps"] == [], rank
    assert saved.keys("async") == []


def test_retention_on_the_coordinator_deletes_the_manifest_first(saved: Saved) -> None:
    for rank, report in saved.results.items():
        assert report["kept"] == [2, 3], rank
    assert [key.split("/")[0] for key in saved.keys("kept")].count("step-00000001") == 0
    log = saved.proxy.requests(path="/kept/")
    manifest_gone = [
        r.n for r in log if r.method == "DELETE" and "step-00000001/manifest" in r.path
    ]
    assert len(manifest_gone) == 1
    # the data goes in one bulk delete (POST ?delete on the bucket) after the manifest's
    bulk = [r.n for r in saved.proxy.requests("POST") if "delete" in r.query]
    data_gone = [n for n in bulk if n > manifest_gone[0]]
    assert data_gone, "the step's data was not deleted after its manifest"
    # only the coordinator deletes (retention, orphans, a failed save's uploads)
    deletes = [
        r
        for r in saved.proxy.log
        if r.method == "DELETE" or (r.method == "POST" and "delete" in r.query)
    ]
    assert deletes
    assert all("tk-rank-0" in r.agent for r in deletes), {r.agent for r in deletes}
    # the manifest of step 1 was created only after every rank's shard (retention order on
    # save: data first, the commit marker last)
    puts = [r for r in log if r.method in ("PUT", "POST") and "step-00000001" in r.path]
    created = [r.n for r in puts if r.path.endswith("manifest.json")]
    shards = [r.n for r in puts if "/shard-" in r.path]
    assert len(created) == 1
    assert shards
    assert max(shards) < created[0]


def test_restore_on_two_ranks_reads_only_each_ranks_ranges(saved: Saved) -> None:
    start = len(saved.proxy.log)
    outcome = harness.run("restore", 2, saved.ctx(), deadline=DEADLINE, module=MODULE)
    for rank, report in outcome.ok().items():
        assert report["step"] == 5, rank
        assert report["epoch"] == 2, rank
        assert report["mismatch"] == [], rank
        assert report["path"] == f"{saved.url}/run/step-00000005"
    shard_sizes = {
        key.rsplit("/", 1)[1]: size
        for key, size in _sizes(saved, "run/step-00000005").items()
        if "/shard-" in key
    }
    total = sum(shard_sizes.values())
    log = saved.proxy.log[start:]
    for rank in (0, 1):
        gets = [
            r
            for r in log
            if r.is_object_get and "/shard-" in r.path and f"tk-rank-{rank}" in r.agent
        ]
        assert gets, rank
        assert all(r.range is not None for r in gets), "a shard object was read whole"
        fetched = sum(_range_length(r.range) for r in gets if r.range)
        # each rank reads its half of the model and optimizer, never the other ranks'
        # random generator states nor any header: far less than the shards hold
        assert fetched < total / 4, (rank, fetched, total)


def test_restore_in_one_process_without_a_group(saved: Saved) -> None:
    report = workers.restore(0, 1, saved.ctx())
    assert report["step"] == 5
    assert report["epoch"] == 2
    assert report["mismatch"] == []


def test_single_process_steps_on_the_bucket_restore_on_two_ranks(saved: Saved) -> None:
    """A job that outgrows one process resumes from its bucket: steps saved by one process
    restore on 2 FSDP2 ranks (resharded, generators left alone with a warning); a damaged one
    makes every rank fall back together, or raise with nothing changed when asked for."""
    workers.single_steps(saved.url, saved.options, saved.out)
    outcome = harness.run("restore_single", 2, saved.ctx(), deadline=DEADLINE, module=MODULE)
    for rank, report in outcome.ok().items():
        entry = report["single"]
        assert (entry["step"], entry["epoch"], entry["seen"]) == (2, 2, 7), rank
        assert entry["mismatch"] == [], rank
        assert entry["rng_warning"], rank
        assert entry["skipped"] == [], rank
        entry = report["single-flipped"]
        assert (entry["step"], entry["mismatch"]) == (1, []), rank
        assert any("step-00000002" in text or "step 2" in text for text in entry["skipped"])
        assert entry["explicit"] == "ChecksumMismatchError", rank
        assert entry["explicit_untouched"], rank


def test_ls_inspect_verify_fetch_sharded_steps_from_the_bucket(
    saved: Saved, capsys: pytest.CaptureFixture[str]
) -> None:
    run = f"{saved.url}/run"
    assert tk.verify(run, storage_options=saved.options).ok
    options = [
        *("--storage-option", f"endpoint_url={saved.proxy.endpoint}"),
        *("--storage-option", "key=testing", "--storage-option", "secret=testing"),
    ]
    assert main(["ls", run, *options]) == 0
    listed = " ".join(capsys.readouterr().out.split())
    assert "sharded steps, saved by several ranks: 3 (4 ranks), 5 (4 ranks)" in listed
    assert main(["verify", f"{run}/step-00000005", *options]) == 0
    capsys.readouterr()
    assert main(["inspect", f"{run}/step-00000005", *options]) == 0
    shown = capsys.readouterr().out
    assert "sharded-v1" in shown
    assert "shard-00003-of-00004.safetensors:" in shown


def test_restore_on_four_ranks_bit_exact(saved: Saved) -> None:
    for rank, report in saved.results.items():
        assert report["restored"] == [5, 2, []], rank


def test_a_flipped_byte_in_one_shard_object_falls_back_on_every_rank(saved: Saved) -> None:
    for rank, report in saved.results.items():
        flipped = report["flipped"]
        assert flipped["step"] == 1, rank
        assert flipped["mismatch"] == [], rank
        assert any("step 2" in text or "step-00000002" in text for text in flipped["skipped"])
        assert flipped["explicit"] == "ChecksumMismatchError", rank
        assert flipped["explicit_untouched"], rank
    assert "shard-00001-of-00004" in saved.results[0]["flipped"]["object"]


def test_a_coordinator_killed_mid_upload_leaves_no_step_and_its_uploads_are_cleaned(
    saved: Saved,
) -> None:
    outcome = harness.run("killed_upload", 2, saved.ctx(victim=0), deadline=DEADLINE, module=MODULE)
    assert outcome.exit_codes[0] == -signal.SIGKILL
    assert not outcome.errors
    assert sorted(outcome.results) == [1]
    assert outcome.results[1].startswith("DistributedCheckpointError"), outcome.results[1]
    url = f"{saved.url}/killed"
    assert tk.CheckpointManager(url, storage_options=saved.options).steps == []
    orphans = saved.keys("killed")
    assert orphans  # the survivor's shard at least: nothing deleted it, nothing lists it
    assert not any(key.endswith("manifest.json") for key in orphans)
    # verify names the interrupted save (it never lists it as a step)
    (problem,) = tk.verify(url, storage_options=saved.options).problems
    assert "step-00000007 has no manifest.json" in problem
    assert "never committed" in problem
    # the next save removes the dead job's uploads once they are past the grace period
    mgr = tk.CheckpointManager(
        url, storage_options=saved.options, transfer=tk.Transfer(orphan_grace_s=0)
    )
    mgr.save(1, model=torch.nn.Linear(2, 2))
    assert {key.split("/")[0] for key in saved.keys("killed")} == {"step-00000001"}
    assert mgr.steps == [1]


def test_object_shards_are_read_by_ranges_sized_and_hashed(memory_bucket: Bucket) -> None:
    from torchkeep.checkpoint.distributed import staging
    from torchkeep.checkpoint.distributed.remote_source import ObjectShard
    from torchkeep.storage.store import ObjectStore

    store = ObjectStore(memory_bucket.url)
    data = bytes(range(256)) * 64
    store.write("step/shard", data)
    chunk = staging.ChunkRef("shard", 100, 1000, xxhash.xxh3_128_hexdigest(data[100:1100]), "t")

    def opener(name: str, size: int) -> ObjectShard:
        return ObjectShard(store, f"step/{name}", size)

    def stage(size: int = len(data), name: str = "shard") -> Any:
        wanted = staging.ChunkRef(name, chunk.offset, chunk.length, chunk.digest, "t")
        return staging.stage(Path("unused"), [wanted], {name: size}, opener=opener)

    assert bytes(stage()[staging.where(chunk)].numpy()) == data[100:1100]
    with pytest.raises(tk.ChecksumMismatchError, match="has 16384 bytes, the manifest says"):
        stage(len(data) + 1)
    with pytest.raises(tk.ChecksumMismatchError, match="missing"):
        stage(name="gone")
    altered = bytearray(data)
    altered[500] ^= 0x01
    store.write("step/shard", bytes(altered))
    with pytest.raises(tk.ChecksumMismatchError, match="do not match their xxh3_128 hash"):
        stage()


def _sizes(saved: Saved, prefix: str) -> dict[str, int]:
    import s3fs

    fs = s3fs.S3FileSystem(**saved.options)
    fs.invalidate_cache()
    base = f"{saved.url.removeprefix('s3://')}/{prefix}"
    return {key: int(info["size"]) for key, info in fs.find(base, detail=True).items()}


def _range_length(header: str) -> int:
    first, last = header.removeprefix("bytes=").split("-")
    return int(last) - int(first) + 1
