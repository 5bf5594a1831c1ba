"""Workers of tests/test_remote_sharded.py (sharded steps on a moto bucket), run per rank by
:mod:`tests._dist_harness`; the model, training and comparisons are tests._dist_workers'."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import torchkeep as tk
from tests._dist_workers import Seen, compare, full_state, init, parts, train

SLOTS = ("model", "optimizer", "scheduler", "tp")


def options(ctx: dict[str, Any], rank: int) -> dict[str, Any]:
    """The bucket's storage options, with a User-Agent that names the rank (the proxy logs
    it: the test tells each rank's requests apart)."""
    return {**ctx["options"], "config_kwargs": {"user_agent_extra": f"tk-rank-{rank}"}}


class UploadFault:
    """Makes rank ``victim``'s shard upload fail after its first span."""

    def __init__(self, victim: int) -> None:
        from torchkeep.storage import objects

        self.objects = objects
        self.original = objects.upload
        rank = dist.get_rank()

        def failing(fs: Any, path: str, url: str, spans: Any, **kw: Any) -> Any:
            if rank == victim and "/shard-" in path:

                def cut(spans: Any = spans) -> Any:
                    for span in spans:
                        yield span
                        raise OSError(f"injected upload failure of rank {rank}")

                spans = cut()
            return self.original(fs, path, url, spans, **kw)

        objects.upload = failing  # type: ignore[assignment]

    def heal(self) -> None:
        self.objects.upload = self.original  # type: ignore[assignment]


def save(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 + AdamW on ``world`` ranks into ``<url>/run``: step 3, a step 4 whose upload
    fails on rank 2, step 5; retention into ``<url>/kept``; an async save that fails."""
    init(rank, world, ctx)
    out, url, opts = Path(ctx["out"]), ctx["url"], options(ctx, rank)
    report: dict[str, Any] = {}
    p = parts(world, "fsdp2")
    torch.manual_seed(100 + rank)
    train(p, 2)
    mgr = tk.CheckpointManager(f"{url}/run", keep_last=None, storage_options=opts, timeout=60)
    kw = {name: p[name] for name in SLOTS}
    report["returned"] = mgr.save(3, metrics={"loss": 0.5}, epoch=1, **kw)
    ref = full_state(p)
    if rank == 0:
        save_file(ref, str(out / "ref3.safetensors"))
    train(p, 1)
    fault = UploadFault(2)
    try:
        mgr.save(4, epoch=9, **kw)
        report["fail"] = "no error"
    except tk.TorchkeepError as exc:
        report["fail"] = (type(exc).__name__, sorted(getattr(exc, "failures", {})), str(exc))
    fault.heal()
    report["steps_after_fail"] = mgr.steps
    mgr.save(5, metrics={"loss": 0.25}, epoch=2, **kw)
    ref = full_state(p)
    if rank == 0:
        save_file(ref, str(out / "ref5.safetensors"))
    kept = tk.CheckpointManager(f"{url}/kept", keep_last=2, storage_options=opts, timeout=60)
    for step in (1, 2, 3):
        kept.save(step, model=p["model"])
    report["kept"] = kept.steps
    amgr = tk.CheckpointManager(
        f"{url}/async", async_save=True, keep_last=None, storage_options=opts, timeout=60
    )
    fault = UploadFault(1)
    amgr.save(1, model=p["model"], optimizer=p["optimizer"])
    try:
        amgr.save(2, model=p["model"], optimizer=p["optimizer"])
        report["async_error"] = "no error"
    except tk.DistributedCheckpointError as exc:
        report["async_error"] = sorted(exc.failures)
    fault.heal()
    amgr.wait()
    report["async_steps"] = amgr.steps
    report["restored"] = restore_latest(mgr, world, rank, out / "ref5.safetensors")
    report["flipped"] = flipped(f"{url}/flipped", opts, world, rank, out)
    dist.barrier()
    dist.destroy_process_group()
    return report


def restore_latest(mgr: tk.CheckpointManager, world: int, rank: int, ref: Path) -> Any:
    """Restore the latest step into zeroed objects: its step and the tensors unlike ``ref``."""
    p = parts(world, "fsdp2", zeros=True)
    restored = mgr.restore(**{name: p[name] for name in SLOTS})
    return [restored.step, restored.extra.get("epoch"), compare(p, ref, rank)]


def flipped(url: str, opts: dict[str, Any], world: int, rank: int, out: Path) -> dict[str, Any]:
    """Steps 1 and 2 in ``url``, then a byte of a model chunk in step 2's second shard is
    flipped: the latest restore falls back to step 1 on every rank, ``restore(2)`` raises with
    nothing changed."""
    p = parts(world, "fsdp2")
    mgr = tk.CheckpointManager(url, keep_last=None, storage_options=opts, timeout=60)
    mgr.save(1, **{name: p[name] for name in SLOTS})
    ref = full_state(p)
    if rank == 0:
        save_file(ref, str(out / "flip1.safetensors"))
    train(p, 1)
    mgr.save(2, **{name: p[name] for name in SLOTS})
    dist.barrier()
    report: dict[str, Any] = {}
    if rank == 0:
        report["object"] = flip_model_byte(f"{url}/step-00000002", opts)
    dist.barrier()
    fresh = parts(world, "fsdp2", zeros=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = mgr.restore(**{name: fresh[name] for name in SLOTS})
    report["step"] = again.step
    report["mismatch"] = compare(fresh, out / "flip1.safetensors", rank)
    report["skipped"] = [str(w.message) for w in caught if "skipped" in str(w.message)]
    untouched = parts(world, "fsdp2", zeros=True)
    before = full_state(untouched)
    try:
        mgr.restore(2, **{name: untouched[name] for name in SLOTS})
        report["explicit"] = "no error"
    except tk.TorchkeepError as exc:
        report["explicit"] = type(exc).__name__
    after = full_state(untouched)
    report["explicit_untouched"] = all(torch.equal(before[k], after[k]) for k in after)
    return report


def restore(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Restore the latest step of ``<url>/run`` into zeroed objects and compare with ref5
    (one process without a group when ``world`` is 1)."""
    if world > 1:
        init(rank, world, ctx)
    out, url, opts = Path(ctx["out"]), ctx["url"], options(ctx, rank)
    mgr = tk.CheckpointManager(f"{url}/run", storage_options=opts, timeout=60)
    p = parts(world, "fsdp2", zeros=True)
    restored = mgr.restore(**{name: p[name] for name in SLOTS})
    report: dict[str, Any] = {
        "step": restored.step,
        "epoch": restored.extra.get("epoch"),
        "path": str(restored.path),
        "mismatch": compare(p, out / "ref5.safetensors", rank),
    }
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return report


def single_steps(url: str, opts: dict[str, Any], out: Path) -> None:
    """Steps 1 and 2 of a single-process manager (no torch.distributed) in ``<url>/single``,
    their full states as ``single1-ref``/``single-ref.safetensors``; then the same two steps in
    ``<url>/single-flipped`` with a byte of step 2's model object flipped."""
    import s3fs

    for folder in ("single", "single-flipped"):
        p = parts(1, "plain")
        mgr = tk.CheckpointManager(
            f"{url}/{folder}", distributed=False, keep_last=None, storage_options=opts
        )
        for step, ref in ((1, "single1-ref"), (2, "single-ref")):
            train(p, 1)
            mgr.save(step, epoch=step, seen=Seen(7), **p)
            if folder == "single":  # the same seeds: both folders hold the same states
                save_file(full_state(p), str(out / f"{ref}.safetensors"))
    fs = s3fs.S3FileSystem(**opts)
    base = f"{url}/single-flipped/step-00000002".removeprefix("s3://")
    key = next(k for k in fs.find(base) if k.endswith("/model.safetensors"))
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0x01  # the last byte of the last tensor
    fs.pipe_file(key, bytes(data))


def restore_single(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Restore ``<url>/single`` and ``<url>/single-flipped`` (steps saved by one process) on
    ``world`` FSDP2 ranks into zeroed objects; ``restore(2)`` of the damaged one must raise
    and change nothing."""
    init(rank, world, ctx)
    out, url, opts = Path(ctx["out"]), ctx["url"], options(ctx, rank)
    report: dict[str, Any] = {}
    for folder, ref in (("single", "single-ref"), ("single-flipped", "single1-ref")):
        mgr = tk.CheckpointManager(f"{url}/{folder}", storage_options=opts, timeout=60)
        p = parts(world, "fsdp2", zeros=True)
        seen = Seen(-1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored = mgr.restore(seen=seen, **p)
        entry: dict[str, Any] = {
            "step": restored.step,
            "epoch": restored.extra.get("epoch"),
            "seen": seen.n,
            "mismatch": compare(p, out / f"{ref}.safetensors", rank),
            "skipped": [str(w.message) for w in caught if "skipped" in str(w.message)],
            "rng_warning": any("random generator" in str(w.message) for w in caught),
        }
        if folder == "single-flipped":
            untouched = parts(world, "fsdp2", zeros=True)
            before = full_state(untouched)
            try:
                mgr.restore(2, **untouched)
                entry["explicit"] = "no error"
            except tk.TorchkeepError as exc:
                entry["explicit"] = type(exc).__name__
            after = full_state(untouched)
            entry["explicit_untouched"] = all(torch.equal(before[k], after[k]) for k in after)
        report[folder] = entry
    dist.barrier()
    dist.destroy_process_group()
    return report


def flip_model_byte(step_url: str, opts: dict[str, Any]) -> str:
    """Flip the first byte of a ``model/0.weight`` chunk in the second shard of the step at
    ``step_url``; return the object's key."""
    import s3fs

    fs = s3fs.S3FileSystem(**{k: v for k, v in opts.items() if k != "config_kwargs"})
    base = step_url.removeprefix("s3://")
    keys = fs.find(base)
    state_key = next(k for k in keys if k.endswith("/state.json"))
    state = json.loads(fs.cat_file(state_key))
    name = "shard-00001-of-00004.safetensors"
    chunk = next(c for c in state["tensors"]["model/0.weight"]["chunks"] if c["file"] == name)
    key = next(k for k in keys if k.endswith("/" + name))
    data = bytearray(fs.cat_file(key))
    data[chunk["offset"]] ^= 0x01
    fs.pipe_file(key, bytes(data))
    return key


def killed_upload(rank: int, world: int, ctx: dict[str, Any]) -> str:
    """Rank ``ctx['victim']`` is SIGKILLed after the first span of its shard's upload; the
    others report the error their ``save`` raised."""
    import os
    import signal

    from torchkeep.storage import objects

    init(rank, world, ctx)
    p = parts(world, "fsdp2")
    url, opts = ctx["url"], options(ctx, rank)
    mgr = tk.CheckpointManager(f"{url}/killed", storage_options=opts, timeout=20.0)
    original = objects.upload

    def dying(fs: Any, path: str, url: str, spans: Any, **kw: Any) -> Any:
        if rank == ctx["victim"] and "/shard-" in path:

            def cut(spans: Any = spans) -> Any:
                for span in spans:
                    yield span
                    os.kill(os.getpid(), signal.SIGKILL)

            spans = cut()
        return original(fs, path, url, spans, **kw)

    objects.upload = dying  # type: ignore[assignment]
    try:
        mgr.save(7, model=p["model"], optimizer=p["optimizer"])
    except tk.DistributedCheckpointError as exc:
        return f"DistributedCheckpointError: {exc}"[:300]
    return "no error"
