"""Sharded checkpoints on 4 gloo ranks: torchkeep's DCP writer/reader against DCP's own.

    python benchmarks/bench_distributed.py [--repeat 3] [--dir DIR] [--quick] [--cache POLICY]

Each rank holds ``1/4`` of a state of DTensors sharded ``Shard(0)`` (8 tensors of 1024 columns),
256 MiB and 1 GiB in all. Like for like, durable: ``dcp.save`` through
``FileSystemWriter(sync_files=True)`` against ``TorchkeepStorageWriter`` (per-chunk hashes,
fsync, manifest, atomic rename), and ``dcp.load`` through ``FileSystemReader`` against
``TorchkeepStorageReader`` + ``NoPickleLoadPlanner`` (every chunk's hash verified before use).
The time of one operation is that of its slowest rank; figures are the median of ``--repeat``
runs, both writers alternating within each run.

``--cache`` sets torchkeep's ``cache=`` policy (``auto``, the writer's default, ``keep`` or
``drop``; :mod:`torchkeep.storage.cache`).

Each save is loaded three times, with the page cache in a stated state for both tools alike:
``after-save`` (as each writer leaves it: DCP writes through the page cache, torchkeep by its
``cache=`` policy), ``cold`` (every file of the step evicted with
``posix_fadvise(DONTNEED)``, no root needed: the files are fsynced, their pages clean) and
``warm`` (every file read once first).

A ``read+hash`` row per cache state gives the part of torchkeep's load spent before any byte
may be copied (every chunk read into staging memory and hashed, :mod:`staging`), measured
inside the same loads: torchkeep's load cannot be faster than it plus one copy of the state
into the destination, which bounds the restore ratio from above.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

from _harness import common_parser

WORLD = 4
KINDS = ("dcp", "torchkeep")
CACHES = ("after-save", "cold", "warm")


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
        times: dict[str, list[float]] = {f"{k}_{op}": [] for k in KINDS for op in _ops(k)}
        for run in range(repeats):
            for kind in KINDS:
                path = Path(out) / f"{kind}-{run}" / "step-00000001"
                writer = (
                    dcp.FileSystemWriter(str(path), sync_files=True)
                    if kind == "dcp"
                    else TorchkeepStorageWriter(path, cache=policy)
                )
                dist.barrier()
                start = time.perf_counter()
                dcp.save(state, storage_writer=writer)
                times[f"{kind}_save"].append(time.perf_counter() - start)
                for cache in CACHES:
                    if rank == 0:
                        _set_cache(path, cache)
                    target = {
                        k: distribute_tensor(torch.zeros(rows, 1024), mesh, [Shard(0)])
                        for k in state
                    }
                    if kind == "dcp":
                        reader, planner = dcp.FileSystemReader(str(path)), None
                    else:
                        reader, planner = TorchkeepStorageReader(path), NoPickleLoadPlanner()
                    dist.barrier()
                    staged.clear()
                    start = time.perf_counter()
                    dcp.load(target, storage_reader=reader, planner=planner)
                    times[f"{kind}_load/{cache}"].append(time.perf_counter() - start)
                    if kind == "torchkeep":
                        times[f"{kind}_read+hash/{cache}"].append(sum(staged))
                    if not all(
                        torch.equal(target[k].to_local(), state[k].to_local()) for k in state
                    ):
                        raise AssertionError(f"{kind}: the loaded state differs from the saved one")
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(path.parent)
        queue.put((rank, "ok", times))
        dist.destroy_process_group()
    except BaseException:  # reported to the parent
        queue.put((rank, "error", traceback.format_exc()))


def _ops(kind: str) -> tuple[str, ...]:
    """The timed operations of ``kind``: save, a load per cache state (torchkeep: and the
    read+hash part of each load)."""
    loads = tuple(f"load/{cache}" for cache in CACHES)
    parts = tuple(f"read+hash/{cache}" for cache in CACHES) if kind == "torchkeep" else ()
    return ("save", *loads, *parts)


def run_case(
    mib: int, repeats: int, scratch: Path | None, policy: str = "auto"
) -> dict[str, list[float]]:
    """Every rank's timings for ``mib`` MiB of state; the slowest rank's time per run."""
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
    keys = messages[0][2]
    return {key: [max(m[2][key][i] for m in messages) for i in range(repeats)] for key in keys}


def main(argv: list[str] | None = None) -> None:
    """Run the 256 MiB and 1 GiB cases (``--quick``: 32 MiB) and print one table."""
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", choices=("auto", "keep", "drop"), default="auto", help="torchkeep's cache="
    )
    args = parser.parse_args(argv)
    sizes = [32] if args.quick else [256, 1024]
    print(
        f"{WORLD} gloo ranks, durable, slowest rank, median of {args.repeat} run(s), seconds; "
        f"torchkeep cache={args.cache!r}"
    )
    print(
        f"{'state':>8} {'op':>16} {'DCP':>8} {'torchkeep':>10} {'ratio':>7}  runs (DCP / torchkeep)"
    )
    for mib in sizes:
        before = os.getloadavg()[0]
        slowest = run_case(mib, args.repeat, args.dir, args.cache)
        after = os.getloadavg()[0]
        print(f"{mib:>5} MiB  load average (1 min): {before:.1f} before, {after:.1f} after")
        for op in _ops("torchkeep"):
            dcp_op = op.replace("read+hash", "load")  # a part of torchkeep's load vs DCP's load
            dcp_runs, tk_runs = slowest[f"dcp_{dcp_op}"], slowest[f"torchkeep_{op}"]
            ours, theirs = statistics.median(tk_runs), statistics.median(dcp_runs)
            runs = f"{[round(t, 2) for t in dcp_runs]} / {[round(t, 2) for t in tk_runs]}"
            print(
                f"{mib:>5} MiB {op:>16} {theirs:>8.2f} {ours:>10.2f} {theirs / ours:>6.2f}x  {runs}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
