"""Workers of the distributed checkpoint tests, run by :mod:`tests._dist_harness` per rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

import torchkeep as tk
from torchkeep import tree

IN, HID, OUT = 8, 12, 6


class Holder:
    """A stateful object holding one tensor-parallel DTensor (``Shard(1)``)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.w = state["w"]


class Seen:
    """A per-rank stateful object (how many samples this rank has seen)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


def init(rank: int, world: int, ctx: dict[str, Any]) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{ctx['store']}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )


def build(world: int, mode: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))
    if mode == "plain" or world == 1:
        return model, None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    return model, mesh


def parts(world: int, mode: str, *, zeros: bool = False) -> dict[str, Any]:
    model, mesh = build(world, mode)
    if zeros:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    torch.manual_seed(1)
    full = torch.zeros(4, 8) if zeros else torch.randn(4, 8)
    if mesh is not None:
        from torch.distributed.tensor import Shard, distribute_tensor

        full = distribute_tensor(full, mesh, [Shard(1)])
    return {"model": model, "optimizer": opt, "scheduler": sched, "tp": Holder(full)}


def train(p: dict[str, Any], steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(4, IN)  # the global generator: a resume must restore it
        p["model"](x).square().mean().backward()
        p["optimizer"].step()
        p["optimizer"].zero_grad()
        p["scheduler"].step()


def full_state(p: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of model + optimizer + the DTensor, gathered (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(p["model"], p["optimizer"], options=options)
    tensors = tree.flatten({"model": msd, "optimizer": osd}).tensors
    w = p["tp"].w
    tensors["tp"] = w.full_tensor() if hasattr(w, "full_tensor") else w
    tensors["lr"] = torch.tensor(p["scheduler"].get_last_lr())
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def compare(p: dict[str, Any], reference: Path, rank: int, only: tuple[str, ...] = ()) -> list[str]:
    """Names of the tensors that differ from ``reference`` (rank 0 compares; others: []);
    ``only``: compare just the names with these prefixes."""
    got = full_state(p)
    if rank != 0:
        return []
    ref = load_file(str(reference))
    if only:
        ref = {k: v for k, v in ref.items() if k.startswith(only)}
        got = {k: v for k, v in got.items() if k.startswith(only)}
    if sorted(ref) != sorted(got):
        return ["keys: " + str(sorted(set(ref) ^ set(got)))]
    return [k for k in ref if not torch.equal(ref[k], got[k])]


def rng_file(out: Path, step: int, rank: int) -> Path:
    return out / f"rng-{step}-{rank}.safetensors"


class _Fault:
    """Makes rank ``victim``'s shard write fail after its first block (raise or SIGKILL)."""

    def __init__(self, kind: str, victim: int) -> None:
        from torchkeep.checkpoint.distributed import writer

        self.writer = writer
        self.original = writer.write_stream
        rank = dist.get_rank()

        def failing(fd: int, spans: Any, hasher: Any = None, **options: Any) -> int:
            def cut() -> Any:
                for span in spans:
                    yield span
                    if kind == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise OSError(f"injected write failure of rank {rank}")

            return self.original(fd, cut() if rank == victim else spans, hasher, **options)

        writer.write_stream = failing  # type: ignore[assignment]

    def heal(self) -> None:
        self.writer.write_stream = self.original  # type: ignore[assignment]


def save_many(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 on ``world`` ranks: replicated-entry check, saves, a failing rank, retention,
    async save with a failing write, and the straight run of the bit-exact resume."""
    init(rank, world, ctx)
    out = Path(ctx["out"])
    report: dict[str, Any] = {}
    p = parts(world, "fsdp2")
    torch.manual_seed(100 + rank)
    train(p, 2)
    mgr = tk.CheckpointManager(out / "ckpt", keep_last=None, per_rank=["seen"])
    report["own_group"] = mgr._session.group is not dist.group.WORLD  # type: ignore[union-attr]
    # a replicated entry that differs on rank 1
    bad = {"lr_note": 0.5 + (rank == 1)}
    try:
        mgr.save(1, model=p["model"], optimizer=p["optimizer"], **bad)
    except tk.UnsupportedValueError as exc:
        report["mismatch"] = str(exc)
    # step 3: model, optimizer, scheduler, the DTensor holder, a value, metrics
    kw = dict(
        model=p["model"],
        optimizer=p["optimizer"],
        scheduler=p["scheduler"],
        tp=p["tp"],
        seen=Seen(10 * rank),
    )
    save_file({"rng": torch.get_rng_state()}, str(rng_file(out, 3, rank)))
    mgr.save(3, metrics={"loss": 0.5}, epoch=1, **kw)
    ref3 = full_state(p)
    if rank == 0:
        save_file(ref3, str(out / "ref3.safetensors"))
    train(p, 1)
    # step 4: rank 2 raises mid-write -> every rank raises, nothing committed
    fault = _Fault("raise", 2)
    try:
        mgr.save(4, **kw)
    except tk.DistributedCheckpointError as exc:
        report["fail"] = (type(exc).__name__, sorted(exc.failures), str(exc)[:300])
    fault.heal()
    report["steps_after_fail"] = mgr.steps
    # step 5 (the resume point), then 3 more steps: the straight run
    save_file({"rng": torch.get_rng_state()}, str(rng_file(out, 5, rank)))
    mgr.save(5, metrics={"loss": 0.25}, epoch=2, **kw)
    ref5 = full_state(p)
    if rank == 0:
        save_file(ref5, str(out / "ref5.safetensors"))
    train(p, 3)
    final = full_state(p)
    if rank == 0:
        save_file(final, str(out / "final.safetensors"))
    # retention across ranks
    kept = tk.CheckpointManager(out / "kept", keep_last=2)
    for step in range(1, 5):
        kept.save(step, model=p["model"])
    report["kept"] = kept.steps
    # async: the step holds the state at the call; a write error surfaces at the next save
    amgr = tk.CheckpointManager(out / "async", async_save=True, keep_last=None)
    amgr.save(1, model=p["model"], optimizer=p["optimizer"])
    amgr_ref = full_state(p)
    train(p, 1)  # training goes on while the save runs
    amgr.wait()
    if rank == 0:
        save_file(amgr_ref, str(out / "async-ref.safetensors"))
    fault = _Fault("raise", 1)
    amgr.save(2, model=p["model"], optimizer=p["optimizer"])
    try:
        amgr.save(3, model=p["model"], optimizer=p["optimizer"])
    except tk.DistributedCheckpointError as exc:
        report["async_error"] = sorted(exc.failures)
    fault.heal()
    amgr.wait()
    report["async_steps"] = amgr.steps
    dist.barrier()
    dist.destroy_process_group()
    return report


def restore_check(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Restore ``ctx['dirs']`` one after another into zeroed objects and compare each with its
    reference; with ``ctx['resume']``, train 3 more steps and compare with the straight run;
    with ``ctx['explicit']``, ``restore(5)`` of a damaged copy must raise and change nothing."""
    distributed = world > 1
    if distributed:
        init(rank, world, ctx)
    out = Path(ctx["out"])
    mode = ctx.get("mode", "fsdp2")
    report: dict[str, Any] = {}
    for name, ref in ctx["dirs"]:
        p = parts(world, mode, zeros=True)
        mgr = tk.CheckpointManager(out / name)
        only = tuple(ctx.get("only", ()))
        targets = {k: v for k, v in p.items() if not only or k in only}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored = mgr.restore(**targets)
        entry: dict[str, Any] = {
            "step": restored.step,
            "epoch": restored.extra.get("epoch"),
            "mismatch": compare(p, out / ref, rank, tuple(f"{k}." for k in only)),
            "skipped": [str(w.message) for w in caught if "skipped" in str(w.message)],
            "rng_warning": any("random generator" in str(w.message) for w in caught),
        }
        if world == ctx.get("saved_world"):
            saved = load_file(str(rng_file(out, restored.step, rank)))["rng"]
            entry["rng_equal"] = torch.equal(torch.get_rng_state(), saved)
        if ctx.get("seen"):  # the per-rank entry
            seen = Seen(-1)
            try:
                mgr.restore(seen=seen)
                entry["seen"] = seen.n
            except tk.StateDictMismatchError as exc:
                entry["seen"] = "refused" if "allow_world_size_change" in str(exc) else str(exc)
                mgr.restore(seen=seen, allow_world_size_change=True)
                entry["seen_after_allow"] = seen.n
        if name in ctx.get("explicit", {}):  # a damaged step asked for by number
            fresh = parts(world, mode, zeros=True)
            untouched = full_state(fresh)
            try:
                mgr.restore(ctx["explicit"][name], **fresh)
            except tk.TorchkeepError as exc:
                entry["explicit"] = type(exc).__name__
            after = full_state(fresh)
            entry["explicit_untouched"] = all(torch.equal(untouched[k], after[k]) for k in after)
        if ctx.get("resume"):
            train(p, 3)
            entry["resume_mismatch"] = compare(p, out / "final.safetensors", rank)
        report[name] = entry
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return report


def killed_save(rank: int, world: int, ctx: dict[str, Any]) -> str:
    """Rank ``ctx['victim']`` is SIGKILLed while writing its shard."""
    init(rank, world, ctx)
    p = parts(world, "fsdp2")
    mgr = tk.CheckpointManager(Path(ctx["out"]) / "ckpt", timeout=30.0)
    _Fault("kill", ctx["victim"])
    try:
        mgr.save(7, model=p["model"], optimizer=p["optimizer"])
    except tk.DistributedCheckpointError as exc:
        return f"DistributedCheckpointError: {exc}"[:300]
    return "no error"


def ddp_roundtrip(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """DDP: save, then restore into fresh zeroed objects on the same ranks; compare."""
    init(rank, world, ctx)
    out = Path(ctx["out"])
    p = parts(world, "ddp")
    torch.manual_seed(100 + rank)
    train(p, 2)
    mgr = tk.CheckpointManager(out / "ddp")
    save_file({"rng": torch.get_rng_state()}, str(rng_file(out, 2, rank)))
    mgr.save(2, epoch=0, **p)
    ref = full_state(p)
    if rank == 0:
        save_file(ref, str(out / "ddp-ref.safetensors"))
    fresh = parts(world, "ddp", zeros=True)
    restored = mgr.restore(**fresh)
    report = {
        "step": restored.step,
        "mismatch": compare(fresh, out / "ddp-ref.safetensors", rank),
        "rng_equal": torch.equal(
            torch.get_rng_state(), load_file(str(rng_file(out, 2, rank)))["rng"]
        ),
    }
    # a step saved by one process (single_steps) restores on every rank
    single = Path(ctx["single"])
    fresh = parts(world, "ddp", zeros=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = tk.CheckpointManager(single / "single").restore(**fresh)
    report["single"] = {
        "step": restored.step,
        "epoch": restored.extra.get("epoch"),
        "mismatch": compare(fresh, single / "single-ref.safetensors", rank),
        "rng_warning": any("random generator" in str(w.message) for w in caught),
    }
    dist.barrier()
    dist.destroy_process_group()
    return report


def single_steps(out: Path) -> None:
    """Steps 1 and 2 of a single-process manager (no torch.distributed) in ``out/single``,
    their full states as ``single1-ref``/``single-ref.safetensors``, and a copy of the folder
    whose step 2 has a flipped byte in a model tensor (``out/single-flipped``)."""
    p = parts(1, "plain")
    mgr = tk.CheckpointManager(out / "single", distributed=False, keep_last=None)
    for step, ref in ((1, "single1-ref"), (2, "single-ref")):
        train(p, 1)
        mgr.save(step, metrics={"loss": 1.0 / step}, epoch=step, seen=Seen(7), **p)
        save_file(full_state(p), str(out / f"{ref}.safetensors"))
    damaged = out / "single-flipped"
    shutil.copytree(out / "single", damaged)
    weights = damaged / "step-00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    weights.write_bytes(bytes(data))


def mesh_2x2(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """FSDP over one mesh dimension and tensor parallelism (Shard(1) weights) over the other:
    save, then restore into fresh zeroed objects on the same mesh; compare."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    init(rank, world, ctx)
    out = Path(ctx["out"])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def make(zeros: bool) -> dict[str, Any]:
        torch.manual_seed(0)
        model: nn.Module = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))
        if zeros:
            with torch.no_grad():
                for param in model.parameters():
                    param.fill_(0.5)
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"model": model, "optimizer": opt, "scheduler": sched, "tp": Holder(torch.ones(1))}

    p = make(False)
    torch.manual_seed(100 + rank // 2)  # the same data within a tensor-parallel group
    train(p, 2)
    mgr = tk.CheckpointManager(out / "mesh")
    mgr.save(2, **{k: v for k, v in p.items() if k != "tp"})
    ref = full_state(p)
    if rank == 0:
        save_file(ref, str(out / "mesh-ref.safetensors"))
    fresh = make(True)
    restored = mgr.restore(**{k: v for k, v in fresh.items() if k != "tp"})
    report = {"step": restored.step, "mismatch": compare(fresh, out / "mesh-ref.safetensors", rank)}
    dist.barrier()
    dist.destroy_process_group()
    return report


def _counted(names: tuple[str, ...]) -> dict[str, int]:
    """Count the calls of ``torch.distributed`` collectives ``names`` from now on."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(dist, name)

        def counting(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            counts[_name] += 1
            return _original(*args, **kw)

        setattr(dist, name, counting)
    return counts


def _malform_rng(step: Path, rank: int) -> None:
    """Make rank ``rank``'s generator states in ``step`` malformed and re-record every hash
    (a well-formed step whose chunks all verify)."""
    from torchkeep.checkpoint.layout import RNG_ENTRY
    from torchkeep.hashing import hash_file

    state_path, manifest_path = step / "state.json", step / "manifest.json"
    state = json.loads(state_path.read_text())
    state["ranks"][rank][RNG_ENTRY]["python"] = "seed"
    state_path.write_text(json.dumps(state))
    manifest = json.loads(manifest_path.read_text())
    size, digest = hash_file(state_path)
    manifest["files"]["state.json"] = {"size": size, "hash": digest}
    manifest_path.write_text(json.dumps(manifest))


def _restore_refused(
    rank: int, world: int, mgr: Any, step: int, scheduler: Any = None
) -> dict[str, Any]:
    """``mgr.restore(step)`` into fresh objects: the error raised and whether every tensor
    of those objects is unchanged."""
    fresh = parts(world, "fsdp2", zeros=True)
    if scheduler is not None:
        fresh["scheduler"] = scheduler(fresh["optimizer"])
    before = full_state(fresh)
    outcome: dict[str, Any] = {"error": None, "failures": {}}
    try:
        mgr.restore(step, model=fresh["model"], optimizer=fresh["optimizer"],
                    scheduler=fresh["scheduler"])  # fmt: skip
    except tk.TorchkeepError as exc:
        outcome["error"] = type(exc).__name__
        outcome["failures"] = {r: type(e).__name__ for r, e in getattr(exc, "failures", {}).items()}
    after = full_state(fresh)
    outcome["untouched"] = all(torch.equal(before[k], after[k]) for k in after)
    return outcome


def _equal(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor of ``ref`` but the holder's (not saved here) is equal in ``got``."""
    return all(torch.equal(ref[k], got[k]) for k in ref if k != "tp")


def restore_gate(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Ranks agree once, with one flag, after every check and before any live tensor changes:
    collectives of a restore that passes; a step whose chunks verify but whose generator
    states are malformed on one rank; a mismatch on one rank only."""
    init(rank, world, ctx)
    out = Path(ctx["out"])
    p = parts(world, "fsdp2")
    mgr = tk.CheckpointManager(out / "gate", keep_last=None)
    mgr.save(1, model=p["model"], optimizer=p["optimizer"], scheduler=p["scheduler"])
    ref1 = full_state(p)
    train(p, 1)
    mgr.save(2, model=p["model"], optimizer=p["optimizer"], scheduler=p["scheduler"])
    ref2 = full_state(p)
    report: dict[str, Any] = {}
    fresh = parts(world, "fsdp2", zeros=True)
    counts = _counted(("all_gather_object", "broadcast_object_list", "all_reduce", "barrier"))
    mgr.restore(model=fresh["model"], optimizer=fresh["optimizer"], scheduler=fresh["scheduler"])
    report["collectives"] = dict(counts)
    got = full_state(fresh)
    report["restored_equal"] = _equal(ref2, got)
    # one rank's generator states are malformed: every rank refuses before anything changes
    dist.barrier()
    if rank == 0:
        _malform_rng(mgr.directory / "step-00000002", world - 1)
    dist.barrier()
    report["rng_explicit"] = _restore_refused(rank, world, mgr, 2)
    fresh = parts(world, "fsdp2", zeros=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = mgr.restore(
            model=fresh["model"], optimizer=fresh["optimizer"], scheduler=fresh["scheduler"]
        )
    got = full_state(fresh)
    report["rng_fallback"] = {
        "step": restored.step,
        "equal": _equal(ref1, got),
        "skipped": [str(w.message) for w in caught if "skipped" in str(w.message)],
    }
    # a scheduler that does not fit, on the last rank only
    other = lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)  # noqa: E731
    report["mismatch"] = _restore_refused(
        rank, world, mgr, 1, scheduler=other if rank == world - 1 else None
    )
    # the last rank fails after every rank verified the step: every rank still raises
    from torchkeep.checkpoint.distributed import restoring

    original = restoring.set_state_dict
    if rank == world - 1:

        def failing(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("injected failure while loading")

        restoring.set_state_dict = failing
    fresh = parts(world, "fsdp2", zeros=True)
    try:
        mgr.restore(1, model=fresh["model"], optimizer=fresh["optimizer"])
        report["late"] = None
    except Exception as exc:
        late = getattr(exc, "failures", {})
        report["late"] = (type(exc).__name__, {r: type(e).__name__ for r, e in late.items()})
    restoring.set_state_dict = original
    dist.barrier()
    dist.destroy_process_group()
    return report


def killed_restore(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Rank ``ctx['victim']`` is SIGKILLed while it stages its chunks: the others raise."""
    init(rank, world, ctx)
    mgr = tk.CheckpointManager(Path(ctx["out"]) / "gate", timeout=30.0)
    fresh = parts(world, "fsdp2", zeros=True)
    before = _local_shards(fresh["model"])
    if rank == ctx["victim"]:
        from torchkeep.checkpoint.distributed import staging

        def die(*args: Any, **kwargs: Any) -> Any:
            os.kill(os.getpid(), signal.SIGKILL)

        staging.stage = die  # type: ignore[assignment]
    report: dict[str, Any] = {"error": None}
    try:
        mgr.restore(1, model=fresh["model"], optimizer=fresh["optimizer"])
    except tk.DistributedCheckpointError as exc:
        report["error"] = str(exc)[:300]
    after = _local_shards(fresh["model"])  # this rank's own: the group lost a peer
    report["untouched"] = all(torch.equal(before[k], after[k]) for k in before)
    return report


def _local_shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of this rank's own part of every parameter (no collective)."""
    return {
        k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
        for k, v in model.state_dict().items()
    }
