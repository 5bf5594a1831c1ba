"""Start N processes of a torch.distributed job on CPU (gloo, file:// rendezvous) and collect
what each one reports, killing stragglers after a deadline.

A worker is a function ``fn(rank, world, ctx) -> value`` in :mod:`tests._dist_workers` (or the
module named by ``run(..., module=)``);
``ctx`` is a dict of the caller's arguments plus ``store`` (the rendezvous file). Its return
value, or its traceback, comes back per rank. A rank that never reports (killed, hung past the
deadline) is simply absent from the result, and its exit code says why.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

DEADLINE = 240.0


@contextlib.contextmanager
def one_rank_group(folder: Path) -> Iterator[None]:
    """A gloo process group of world size 1 in this process, rendezvous through a file in
    ``folder``, destroyed on exit."""
    import torch.distributed as dist

    rendezvous = folder / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass
class Outcome:
    """What each rank reported (``results``), the tracebacks of those that raised (``errors``)
    and every process's exit code (None: it was still running at the deadline and killed)."""

    results: dict[int, Any]
    errors: dict[int, str]
    exit_codes: dict[int, int | None]

    def ok(self) -> dict[int, Any]:
        """The results, after asserting that every rank reported one and none raised."""
        assert not self.errors, "\n".join(self.errors.values())
        assert len(self.results) == len(self.exit_codes), (self.results, self.exit_codes)
        return self.results


def _child(module: str, name: str, rank: int, world: int, ctx: dict[str, Any], out: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import importlib

        import torch

        torch.set_num_threads(1)
        value = getattr(importlib.import_module(module), name)(rank, world, ctx)
    except BaseException:  # reported to the parent; nothing escapes the child silently
        out.put((rank, "error", traceback.format_exc()))
        return
    out.put((rank, "ok", value))


def run(
    name: str,
    world: int,
    ctx: dict[str, Any],
    *,
    deadline: float = DEADLINE,
    module: str = "tests._dist_workers",
) -> Outcome:
    """Run worker ``name`` of ``module`` on ``world`` spawned processes; their outcome."""
    spawn = mp.get_context("spawn")
    out = spawn.Queue()
    store = Path(tempfile.mkdtemp(prefix="tk-pg-")) / "store"
    ctx = {**ctx, "store": str(store)}
    procs = [
        spawn.Process(target=_child, args=(module, name, r, world, ctx, out)) for r in range(world)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    end = time.monotonic() + deadline
    while len(results) + len(errors) < world and time.monotonic() < end:
        try:
            rank, status, value = out.get(timeout=0.5)
        except queue.Empty:
            if not any(proc.is_alive() for proc in procs):
                break  # a killed rank never reports
            continue
        (results if status == "ok" else errors)[rank] = value
    codes: dict[int, int | None] = {}
    for rank, proc in enumerate(procs):
        proc.join(timeout=max(1.0, end - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
            codes[rank] = None
        else:
            codes[rank] = proc.exitcode
    return Outcome(results, errors, codes)
