"""Sharded checkpoints on 4 gloo ranks: torchkeep's DCP writer/reader against DCP's own.

    python benchmarks/bench_distributed.py [--repeat 3] [--dir DIR] [--quick] [--cache POLICY]

Each rank holds ``1/4`` of a state of DTensors sharded ``Shard(0)`` (8 tensors of 1024 columns),
256 MiB and 1 GiB in all. Like for like, durable: ``dcp.save`` through
``FileSystemWriter(sync_files=True)`` against ``TorchkeepStorageWriter`` (per-chunk hashes,
fsync, manifest, atomic rename), and ``dcp.load`` through ``FileSystemReader`` against
``TorchkeepStorageReader`` + ``NoPickleLoadPlanner`` (every chunk's hash verified before use).
The time of one operation is that of its slowest rank; figures are the median of ``--repeat``
runs. The two tools of each pair take turns going first (DCP in even runs, torchkeep in odd
ones), so that neither always follows the other's writes and deletions.

A second pair saves and restores a module holding the same DTensors as parameters the way each
user writes it (the ``model`` rows): DCP's recipe (``get_model_state_dict``, ``dcp.save`` /
``dcp.load`` through the same writer and reader, ``set_model_state_dict``) against a distributed
``CheckpointManager``'s ``save(1, model=...)`` and ``restore(model=...)``.

``--cache`` sets torchkeep's ``cache=`` policy (``auto``, the writer's default, ``keep`` or
``drop``; :mod:`torchkeep.storage.cache`).

Each save is loaded three times, with the page cache in a stated state for both tools alike:
``after-save`` (as each writer leaves it: DCP writes through the page cache, torchkeep by its
``cache=`` policy), ``cold`` (every file of the step evicted with
``posix_fadvise(DONTNEED)``, no root needed: the files are fsynced, their pages clean) and
``warm`` (every file read once first).

Floors are measured in the same run, on torchkeep's own shard files, each rank on its own
shard at once:

- ``read floor/cold``: the evicted file read whole with buffered 1 MiB reads into memory
  faulted in beforehand, nothing else done with the bytes: what a reader that reads this way
  must spend (on the VM measured here 4 MiB reads, as the verified floor makes, were often
  faster).
- ``verified floor/cold`` and ``/warm``: the least a reader that verifies before it copies must
  do, with nothing else (no index, no planning, no collective, no fresh memory): the file read
  in 4 MiB pieces (cold: buffered reads into memory faulted in beforehand; warm: a private
  mapping of the cached file), each piece hashed (XXH3-128) as it lands, then every byte
  copied into memory faulted in beforehand, as a restore copies into live tensors once every
  rank has verified. DCP's load over it bounds any verified restore's ratio from above.
- ``fresh floor/cold``: the same cold read, hash and copy, but read into fresh anonymous memory
  (:func:`staging.allocate`), as a restore that keeps the bytes it hashed in memory of its own
  until every rank has verified must: the first restore of a process has no memory faulted
  in to read into.

The ``peak`` column gives, for each save, load and restore, the most resident memory one rank
added while it ran (median over the runs; Linux ``VmHWM`` reset through
``/proc/self/clear_refs``, as :mod:`_harness` measures). Pages of a mapped file count: a
torchkeep restore of a cached step maps its shard, one of an uncached step reads it into memory
of its own, either way until every rank has verified.

A ``read+hash`` row per cache state gives the part of torchkeep's load spent before any byte
may be copied (every chunk read into staging memory and hashed, :mod:`staging`), measured
inside the same loads: torchkeep's load cannot be faster than it plus one copy of the state
into the destination, which bounds the restore ratio from above.
"""

from __future__ import annotations

import functools
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from _harness import Result, Summary, common_parser, timed, write_json

WORLD = 4
KINDS = ("dcp", "torchkeep")
MODEL_KINDS = ("dcp-model", "manager")
CACHES = ("after-save", "cold", "warm")
FLOORS = ("read floor/cold", "verified floor/cold", "fresh floor/cold", "verified floor/warm")
PIECE = 4 << 20
"""Bytes per read and hash of the verified floor (torchkeep's staging reads such pieces)."""


def _set_cache(step: Path, cache: str) -> None:
    """Put every file of ``step`` in the page-cache state ``cache`` (see the module docstring)."""
    for path in sorted(p for p in step.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            if cache == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            elif cache == "warm":
                while os.read(fd, 1 << 24):
                    pass
        finally:
            os.close(fd)


def _worker(
    rank: int, store: str, out: str, mib: int, repeats: int, policy: str, queue: Any
) -> None:
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from torchkeep.checkpoint.distributed import staging
        from torchkeep.distributed import (
            NoPickleLoadPlanner,
            TorchkeepStorageReader,
            TorchkeepStorageWriter,
        )

        staged: list[float] = []
        stage = staging.stage

        def timed_stage(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return stage(*args, **kwargs)
            finally:
                staged.append(time.perf_counter() - start)

        staging.stage = timed_stage

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=300),
        )
        mesh = init_device_mesh("cpu", (WORLD,))
        rows = (mib << 20) // 4 // 8 // 1024
        torch.manual_seed(0)
        state = {
            f"w{i}": distribute_tensor(torch.randn(rows, 1024), mesh, [Shard(0)]) for i in range(8)
        }

        def zeros() -> dict[str, Any]:
            return {k: distribute_tensor(torch.zeros(rows, 1024), mesh, [Shard(0)]) for k in state}

        times: dict[str, list[float]] = {
            f"{k}_{op}": [] for k in (*KINDS, *MODEL_KINDS) for op in _ops(k)
        }
        peaks: dict[str, list[int]] = {}

        def record(key: str, call: Callable[[], object]) -> None:
            """Time ``call`` on every rank at once (a barrier first) and keep its peak."""
            measured = timed(call, dist.barrier)
            times[key].append(measured.seconds)
            peaks.setdefault(key, []).append(measured.peak_rss)

        for run in range(repeats):
            for kind in KINDS if run % 2 == 0 else KINDS[::-1]:
                path = Path(out) / f"{kind}-{run}" / "step-00000001"
                writer = (
                    dcp.FileSystemWriter(str(path), sync_files=True)
                    if kind == "dcp"
                    else TorchkeepStorageWriter(path, cache=policy)
                )
                record(f"{kind}_save", functools.partial(dcp.save, state, storage_writer=writer))
                for cache in CACHES:
                    if rank == 0:
                        _set_cache(path, cache)
                    target = zeros()
                    if kind == "dcp":
                        reader, planner = dcp.FileSystemReader(str(path)), None
                    else:
                        reader, planner = TorchkeepStorageReader(path), NoPickleLoadPlanner()
                    staged.clear()
                    record(
                        f"{kind}_load/{cache}",
                        functools.partial(dcp.load, target, storage_reader=reader, planner=planner),
                    )
                    if kind == "torchkeep":
                        times[f"{kind}_read+hash/{cache}"].append(sum(staged))
                    _check(kind, target, state)
                if kind == "torchkeep":  # the floors of a load, same files
                    shard = next(path.glob(f"shard-{rank:05d}-of-*.safetensors"))
                    for floor in FLOORS:
                        if rank == 0:
                            _set_cache(path, floor.split("/")[1])
                        dist.barrier()
                        times[f"torchkeep_{floor}"].append(_floor(shard, floor))
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(path.parent)
            for kind in MODEL_KINDS if run % 2 == 0 else MODEL_KINDS[::-1]:
                folder = Path(out) / f"{kind}-{run}"
                saved = _model(state)
                save, restore, step = _model_ops(kind, folder, policy)
                record(f"{kind}_save", functools.partial(save, saved))
                for cache in CACHES:
                    if rank == 0:
                        _set_cache(step, cache)
                    target = _model(zeros())
                    record(f"{kind}_restore/{cache}", functools.partial(restore, target))
                    _check(kind, dict(target.named_parameters()), state)
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(folder)
        queue.put((rank, "ok", (times, peaks)))
        dist.destroy_process_group()
    except BaseException:  # reported to the parent
        queue.put((rank, "error", traceback.format_exc()))


def _model(state: dict[str, Any]) -> Any:
    """A module whose parameters are the (DTensor) tensors of ``state``."""
    from torch import nn

    model = nn.Module()
    for name, tensor in state.items():
        model.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    return model


def _model_ops(kind: str, folder: Path, policy: str) -> tuple[Any, Any, Path]:
    """The save and restore of a model's training state the way a user of ``kind`` writes
    them, and the step folder the save creates.

    ``dcp-model``: DCP's recipe (``get_model_state_dict``, ``dcp.save``/``dcp.load`` through
    ``FileSystemWriter(sync_files=True)``/``FileSystemReader``, ``set_model_state_dict``);
    ``manager``: a distributed ``CheckpointManager``'s ``save(1, model=...)`` and
    ``restore(model=...)``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    import torchkeep as tk

    step = folder / "step-00000001"
    if kind == "manager":
        manager = tk.CheckpointManager(folder, cache=policy, keep_last=None)  # collective
        return (
            lambda model: manager.save(1, model=model),
            lambda model: manager.restore(model=model),
            step,
        )

    def save(model: Any) -> None:
        writer = dcp.FileSystemWriter(str(step), sync_files=True)
        dcp.save({"model": get_model_state_dict(model)}, storage_writer=writer)

    def restore(model: Any) -> None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(step)))
        set_model_state_dict(model, state["model"])

    return save, restore, step


def _check(kind: str, loaded: dict[str, Any], state: dict[str, Any]) -> None:
    """Raise unless every tensor of ``loaded`` holds this rank's part of ``state``."""
    import torch

    if not all(torch.equal(loaded[k].to_local(), state[k].to_local()) for k in state):
        raise AssertionError(f"{kind}: the loaded state differs from the saved one")


def _floor(path: Path, floor: str) -> float:
    """Seconds one of :data:`FLOORS` takes on the shard ``path`` (see the module docstring):
    ``read floor/cold`` reads it in 1 MiB pieces into memory faulted in beforehand; the others
    read it in :data:`PIECE` pieces (``verified floor/cold``: into memory faulted in beforehand,
    ``fresh floor/cold``: into fresh memory, ``verified floor/warm``: from a private mapping),
    hash each piece as it lands and copy every byte into memory faulted in beforehand."""
    import torch
    import xxhash

    from torchkeep.checkpoint.distributed.staging import allocate

    size = path.stat().st_size
    verified = not floor.startswith("read")
    mapped = floor.endswith("/warm")
    piece = PIECE if verified else 1 << 20
    fd = os.open(path, os.O_RDONLY)
    try:
        if mapped:
            memory = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE)
            staged = torch.frombuffer(memory, dtype=torch.uint8)
        elif floor.startswith("fresh"):
            staged = allocate(size)
        else:
            staged = torch.ones(size, dtype=torch.uint8)  # faulted in
        destination = torch.ones(size, dtype=torch.uint8) if verified else None  # like live tensors
        view = memoryview(staged.numpy())
        start = time.perf_counter()
        for offset in range(0, size, piece):
            part = view[offset : offset + piece]
            if not mapped:
                os.preadv(fd, [part], offset)
            if verified:
                xxhash.xxh3_128(part)
        if destination is not None:
            destination.copy_(staged)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def _ops(kind: str) -> tuple[str, ...]:
    """The timed operations of ``kind``: save, a load (a restore for the model kinds) per
    cache state (torchkeep: and the read+hash part of each load)."""
    if kind in MODEL_KINDS:
        return ("save", *(f"restore/{cache}" for cache in CACHES))
    loads = tuple(f"load/{cache}" for cache in CACHES)
    parts = (*(f"read+hash/{cache}" for cache in CACHES), *FLOORS) if kind == "torchkeep" else ()
    return ("save", *loads, *parts)


def run_case(
    mib: int, repeats: int, scratch: Path | None, policy: str = "auto"
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Every rank's timings for ``mib`` MiB of state: per operation, the slowest rank's time
    per run, and (for saves, loads and restores) the largest peak memory a rank added."""
    import torch.multiprocessing as mp

    out = tempfile.mkdtemp(prefix="tk-bench-dist-", dir=scratch)
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    store = str(Path(out) / "pg-store")
    procs = [
        spawn.Process(target=_worker, args=(r, store, out, mib, repeats, policy, queue))
        for r in range(WORLD)
    ]
    for proc in procs:
        proc.start()
    try:
        messages = [queue.get(timeout=1800) for _ in range(WORLD)]
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(out, ignore_errors=True)
    failed = [m[2] for m in messages if m[1] != "ok"]
    if failed:
        raise RuntimeError(failed[0])
    times = {
        key: [max(m[2][0][key][i] for m in messages) for i in range(repeats)]
        for key in messages[0][2][0]
    }
    peaks = {
        key: [max(m[2][1][key][i] for m in messages) for i in range(repeats)]
        for key in messages[0][2][1]
    }
    return times, peaks


def main(argv: list[str] | None = None) -> list[Result]:
    """Run the 256 MiB and 1 GiB cases (``--quick``: 32 MiB), print one table and return every
    measured row (``--json`` writes them; ``run.py --json`` collects them)."""
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", choices=("auto", "keep", "drop"), default="auto", help="torchkeep's cache="
    )
    args = parser.parse_args(argv)
    sizes = [32] if args.quick else [256, 1024]
    print(
        f"{WORLD} gloo ranks, durable, slowest rank, median of {args.repeat} run(s), seconds; "
        f"peak = the most memory a rank added, MiB; torchkeep cache={args.cache!r}"
    )
    print(
        f"{'state':>8} {'op':>24} {'DCP':>8} {'torchkeep':>10} {'ratio':>7} {'peak':>11}"
        "  runs (DCP / torchkeep)"
    )
    results: list[Result] = []
    for mib in sizes:
        before = os.getloadavg()[0]
        times, peaks = run_case(mib, args.repeat, args.dir, args.cache)
        after = os.getloadavg()[0]
        print(f"{mib:>5} MiB  load average (1 min): {before:.1f} before, {after:.1f} after")
        rows = [
            (f"dcp_load/{op.rsplit('/', 1)[1]}" if "/" in op else "dcp_save", f"torchkeep_{op}", op)
            for op in _ops("torchkeep")
        ]  # a part of torchkeep's load (or a floor) against DCP's load in that cache state
        rows += [(f"dcp-model_{op}", f"manager_{op}", f"model {op}") for op in _ops("manager")]
        for dcp_key, tk_key, op in rows:
            summaries = [
                Summary(
                    statistics.median(times[key]),
                    int(statistics.median(peaks[key])) if key in peaks else 0,
                    times[key],
                )
                for key in (dcp_key, tk_key)
            ]
            theirs, ours = summaries
            own = tk_key in peaks  # a whole operation of both tools, not a part or a floor
            results += [
                Result(f"{mib} MiB", op, tool, mib << 20, summary)
                for tool, summary in zip(("DCP", "torchkeep"), summaries, strict=True)
                if own or tool == "torchkeep"
            ]
            peak = f"{theirs.peak_rss >> 20}/{ours.peak_rss >> 20}" if own else ""
            runs = f"{[round(t, 2) for t in theirs.runs]} / {[round(t, 2) for t in ours.runs]}"
            print(
                f"{mib:>5} MiB {op:>24} {theirs.seconds:>8.2f} {ours.seconds:>10.2f} "
                f"{theirs.seconds / ours.seconds:>6.2f}x {peak:>11}  {runs}"
            )
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
