"""Training checkpoints: torchkeep's CheckpointManager against the tutorial's torch.save dict.

    python benchmarks/bench_checkpoint.py [--gib 1.0] [--repeat 3] [--dir DIR] [--quick]

A model of ``--gib`` GiB of float32 weights (square linear layers) with AdamW state (twice the
weights), page cache warm, like for like:

- save: ``torch.save({"epoch", "model_state_dict", "optimizer_state_dict", "loss"})`` followed by
  an fsync, against a durable synchronous ``mgr.save`` (hashes, fsync, atomic commit, RNG);
- restore: ``torch.load`` + ``model.load_state_dict`` + ``optimizer.load_state_dict``, against
  ``mgr.restore`` (every file's hash verified before anything is loaded), each after one
  untimed restore so both files are in the page cache (torchkeep writes with direct I/O, which
  leaves its files out of the cache; the first, cold restore is reported too);
- async: the time ``save()`` blocks with ``async_save=True``, from the second save on;
- hashes: throughput of candidate hashes on one core, and what hashing adds to a durable save
  (the same save with a hasher that does nothing; it runs beside the disk writes).

Figures are the median of ``--repeats`` runs, in seconds.
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
from _harness import common_parser
from torchkeep import manifest

WIDTH = 4096  # one 4096x4096 float32 layer is 64 MiB


def build(gib: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A stack of linear layers with ``gib`` GiB of weights and a stepped AdamW."""
    layers = max(1, round(gib * 1024 / 64))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
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


def main(argv: list[str] | None = None) -> None:
    """Measure save, restore and async saves against the tutorial's torch.save dict."""
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="model size in GiB (default 1)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        run(0.125 if args.quick else args.gib, args.repeat, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(gib: float, repeats: int, workdir: Path) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    model, optimizer = build(gib)
    total = sum(p.numel() * 4 * 3 for p in model.parameters())
    print(f"model {gib:g} GiB + AdamW state: {total / 2**30:.2f} GiB in all; {repeats} repeats")
    pt = workdir / "tutorial.pt"
    ckpt = workdir / "ckpt"
    step = iter(range(10**6))

    def tk_save() -> None:
        mgr = tk.CheckpointManager(ckpt, keep_last=1)
        mgr.save(next(step), model=model, optimizer=optimizer, metrics={"loss": 0.5}, epoch=1)

    torch_save_s = median_time(lambda: torch_save(model, optimizer, pt), repeats)
    tk_save_s = median_time(tk_save, repeats)
    with mock.patch.object(manifest, "new_hasher", _NoHash):
        unhashed_save_s = median_time(tk_save, repeats)
    tk_save(), torch_restore(model, optimizer, pt)  # warm-up: the peer's file is cached now
    torch_load_s = median_time(lambda: torch_restore(model, optimizer, pt), repeats)
    mgr = tk.CheckpointManager(ckpt, keep_last=1)
    cold_load_s = median_time(lambda: mgr.restore(model=model, optimizer=optimizer), 1)
    tk_load_s = median_time(lambda: mgr.restore(model=model, optimizer=optimizer), repeats)
    pt.unlink()

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
    rows = [
        ("save, durable", torch_save_s, tk_save_s, f"{torch_save_s / tk_save_s:.2f}x faster"),
        ("restore", torch_load_s, tk_load_s, f"{torch_load_s / tk_load_s:.2f}x faster"),
        (
            "async save: time blocked",
            tk_save_s,
            async_s,
            f"{async_s / tk_save_s:.0%} of a sync save",
        ),
    ]
    print(f"{'operation':<26} {'torch / sync':>12} {'torchkeep':>10}  result")
    for name, peer, ours, verdict in rows:
        print(f"{name:<26} {peer:>11.2f}s {ours:>9.2f}s  {verdict}")
    print(f"first restore right after the save (torchkeep files not cached): {cold_load_s:.2f}s")
    print("hash throughput, one core: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in speeds.items()))
    print(
        f"durable torchkeep save without hashing: {unhashed_save_s:.2f}s (with: {tk_save_s:.2f}s;"
        f" xxh3_128 over every byte alone takes {total / (speeds['xxh3_128'] * 1e9):.2f}s on one"
        " core, beside the disk writes)"
    )


if __name__ == "__main__":
    main()
