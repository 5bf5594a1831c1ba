"""Training checkpoints: torchkeep's CheckpointManager against the tutorial's torch.save dict.

    python benchmarks/bench_checkpoint.py [--gib 1.0] [--repeat 3] [--dir DIR] [--quick] [--extras]

A model of ``--gib`` GiB of float32 weights (square linear layers) with AdamW state (twice the
weights), each operation in a fresh process (see ``_harness``), like for like:

- save: ``torch.save({"epoch", "model_state_dict", "optimizer_state_dict", "loss"})`` followed by
  an fsync of the file and its folder, against a durable synchronous ``mgr.save`` (hashes,
  fsync, atomic commit, RNG; the default ``cache="auto"``);
- restore, into a freshly built model and AdamW (no optimizer state yet, as the tutorial's
  resume script has): ``torch.load`` + ``model.load_state_dict`` +
  ``optimizer.load_state_dict``, against ``mgr.restore`` (every file's hash verified before
  anything is loaded), in three page-cache
  states: right after each tool's own save, cold (page cache dropped: root only) and warm;
- with ``--extras``, in one process: the time ``save()`` blocks with ``async_save=True`` (from
  the second save on), the throughput of candidate hashes on one core, and what hashing adds
  to a durable save (the same save with a hasher that does nothing).

Figures are the median of ``--repeat`` runs, in seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import xxhash
from torch import nn

import torchkeep as tk
from _harness import (
    AFTER_SAVE,
    COLD,
    WARM,
    Result,
    StateRuns,
    cold_note,
    common_parser,
    measure,
    print_states,
    write_json,
)
from torchkeep import manifest

WIDTH = 4096  # one 4096x4096 float32 layer is 64 MiB


def build(gib: float, *, stepped: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A stack of linear layers with ``gib`` GiB of weights and an AdamW, stepped once (its
    state made) unless ``stepped=False`` (a freshly built one, as a resume script has)."""
    layers = max(1, round(gib * 1024 / 64))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if not stepped:
        return model, optimizer
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    return model, optimizer


def median_time(
    fn: Callable[[], object], repeats: int, setup: Callable[[], object] = lambda: None
) -> float:
    times = []
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_save(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The tutorial's checkpoint, made as durable as a torchkeep save (fsync of file and folder)."""
    with open(path, "wb") as f:
        torch.save(
            {
                "epoch": 1,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "loss": 0.5,
            },
            f,
        )
        f.flush()
        os.fsync(f.fileno())
    tk.storage.local.fsync_dir(path.parent)


class _NoHash:
    """A hasher that does nothing, to measure what hashing adds to a save."""

    def update(self, data: object, /) -> None:
        pass

    def hexdigest(self) -> str:
        return "0"


def torch_restore(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    checkpoint = torch.load(path)
    model.load_state_dict(checkpoint["model_state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])


def hash_speeds(nbytes: int = 256 << 20) -> dict[str, float]:
    """GB/s of each candidate hash over an in-memory buffer, one core."""
    data = memoryview(torch.randint(0, 255, (nbytes,), dtype=torch.uint8).numpy())
    candidates: dict[str, Callable[[], object]] = {
        "xxh3_128": lambda: xxhash.xxh3_128(data).hexdigest(),
        "sha256": lambda: hashlib.sha256(data).hexdigest(),
        "blake2b": lambda: hashlib.blake2b(data).hexdigest(),
    }
    try:
        import blake3  # type: ignore[import-not-found]

        candidates["blake3 (1 thread)"] = lambda: blake3.blake3(data).hexdigest()
    except ImportError:
        pass
    return {name: nbytes / median_time(fn, 3) / 1e9 for name, fn in candidates.items()}


TOOLS = ("torchkeep", "torch")
SAVE, RESTORE = "durable save", "restore"


def _paths(folder: str) -> dict[str, Path]:
    return {"torchkeep": Path(folder) / "ckpt", "torch": Path(folder) / "tutorial.pt"}


def save_op(tool: str, folder: str, gib: float, step: int) -> Callable[[], None]:
    """A durable checkpoint save of a freshly built model and optimizer (runs in a child)."""
    model, optimizer = build(gib)
    target = _paths(folder)[tool]
    if tool == "torch":
        target.unlink(missing_ok=True)
        return lambda: torch_save(model, optimizer, target)
    mgr = tk.CheckpointManager(target, keep_last=1)
    return lambda: _ignore(
        mgr.save(step, model=model, optimizer=optimizer, metrics={"loss": 0.5}, epoch=1)
    )


def restore_op(tool: str, folder: str, gib: float) -> Callable[[], None]:
    """A restore into a freshly built model and optimizer, as the tutorial's resume does (the
    optimizer has no state yet; runs in a child)."""
    model, optimizer = build(gib, stepped=False)
    source = _paths(folder)[tool]
    if tool == "torch":
        return lambda: torch_restore(model, optimizer, source)
    mgr = tk.CheckpointManager(source, keep_last=1)
    return lambda: _ignore(mgr.restore(model=model, optimizer=optimizer))


def _ignore(_: object) -> None:
    pass


def measure_states(gib: float, repeats: int, folder: Path, states: list[str]) -> list[Result]:
    """Save and restore with both tools, each restore in every cache state, fresh processes."""
    nbytes = max(1, round(gib * 1024 / 64)) * (64 << 20) * 3  # weights + two AdamW moments
    runs = StateRuns()
    steps = iter(range(10**6))
    case = f"{gib:g} GiB + AdamW"
    for _ in range(repeats):
        for tool in TOOLS:
            args = {"tool": tool, "folder": str(folder), "gib": gib}
            for state in states:
                if state == AFTER_SAVE or not _paths(str(folder))[tool].exists():
                    print(f"  {SAVE} {tool}", flush=True)
                    run = measure("bench_checkpoint:save_op", step=next(steps), **args)
                    runs.add(case, nbytes, SAVE, "", tool, run)
                print(f"  {RESTORE} {state} {tool}", flush=True)
                warm = [str(_paths(str(folder))[tool])] if state == WARM else []
                run = measure("bench_checkpoint:restore_op", cold=state == COLD, warm=warm, **args)
                runs.add(case, nbytes, RESTORE, state, tool, run)
    return runs.results()


def main(argv: list[str] | None = None) -> list[Result]:
    """Measure save and restore (three cache states) against the tutorial's torch.save dict."""
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="model size in GiB (default 1)")
    parser.add_argument("--state", choices=[AFTER_SAVE, COLD, WARM], action="append")
    parser.add_argument("--extras", action="store_true", help="also async save and hashing")
    args = parser.parse_args(argv)
    states = args.state or [AFTER_SAVE, COLD, WARM]
    note = cold_note()
    if note and COLD in states:
        print(f"note: {note}")
        states.remove(COLD)
    gib = 0.0625 if args.quick else args.gib
    workdir = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        results = measure_states(gib, args.repeat, workdir, states)
        print_states(f"checkpoints, median of {args.repeat} runs", results, TOOLS)
        print(f"model {gib:g} GiB + AdamW state: {gib * 3:.2f} GiB in all")
        if args.json:
            write_json(args.json, results)
        if args.extras:
            extras(gib, args.repeat, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def extras(gib: float, repeats: int, workdir: Path) -> None:
    """Async save blocking time and hashing costs, measured in this process."""
    torch.set_num_threads(os.cpu_count() or 1)
    model, optimizer = build(gib)
    total = sum(p.numel() * 4 * 3 for p in model.parameters())
    ckpt = workdir / "extras"
    step = iter(range(10**6))

    def tk_save() -> None:
        mgr = tk.CheckpointManager(ckpt, keep_last=1)
        mgr.save(next(step), model=model, optimizer=optimizer, metrics={"loss": 0.5}, epoch=1)

    tk_save_s = median_time(tk_save, repeats)
    with mock.patch.object(manifest, "new_hasher", _NoHash):
        unhashed_save_s = median_time(tk_save, repeats)
    async_mgr = tk.CheckpointManager(workdir / "async", keep_last=1, async_save=True)
    async_mgr.save(0, model=model, optimizer=optimizer, epoch=0)  # first save allocates buffers
    counter = iter(range(1, 10**6))
    async_s = median_time(
        lambda: async_mgr.save(next(counter), model=model, optimizer=optimizer, epoch=0),
        repeats,
        setup=async_mgr.wait,  # training time between saves: the previous save has finished
    )
    async_mgr.wait()
    speeds = hash_speeds()
    print(f"async save: save() blocks {async_s:.2f}s, {async_s / tk_save_s:.0%} of a sync save")
    print("hash throughput, one core: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in speeds.items()))
    print(
        f"durable torchkeep save without hashing: {unhashed_save_s:.2f}s (with: {tk_save_s:.2f}s;"
        f" xxh3_128 over every byte alone takes {total / (speeds['xxh3_128'] * 1e9):.2f}s on one"
        " core, beside the disk writes)"
    )


if __name__ == "__main__":
    main()
