"""The machine's floors for issue 11's two save-then-load targets, beside safetensors' own times.

A durable save either leaves its file in the page cache or it does not:

- if it does, it cannot take less than writing the bytes through the page cache and waiting for
  them to reach the disk (``cached write + fsync``: 8 MiB ``pwrite`` calls from one reused
  buffer, then ``fsync``; no serialisation, no hashing, nothing else);
- if it does not, the next load cannot take less than reading the file from the disk
  (``direct read``: 8 MiB ``O_DIRECT`` reads into one reused buffer, nothing else).

Against safetensors (``save_file`` + ``fsync``, then ``load_file`` of the file it just saved,
fresh process each), the best any implementation could reach on this machine is therefore
``safetensors save / cached write + fsync`` for a save that keeps its file cached and
``safetensors load right after its save / direct read`` for a load after a save that did not.
If the first is under 1.5 and the second under 1.0, no cache policy meets both targets of
issue 11 (save >= 1.5x, load right after the save >= 1.0x) here; the table says which.

A third way, what ``cache="auto"`` does when the page cache is slow to write: write direct,
then have the kernel read the file back into the cache after the save (``read back``: the time
from asking until every page is cached, through torchkeep's own read-back,
:func:`torchkeep.storage.cache.refill_after_save`). The load that follows reads memory when it
starts later than that.

One more floor, ``read, not cached (direct, 4 readers)``: the disk's ceiling for several
readers at once (a cold restore by 4 ranks cannot read faster, whatever the tool).

And the floor of a load into a model whose file is cached, ``read, cached, into memory
(2 threads)``: the file copied out of the page cache straight into memory already in use (as a
model's parameters are), by two threads, one half each, nothing else. Every tool's load of a
cached file into a model copies at least that much, so none can be faster. Likewise for a lazy
load of a cached file, ``map + touch, cached``: the file mapped privately
(``torch.UntypedStorage.from_file``, as torchkeep's and safetensors' lazy loaders do) and summed,
which is what bench_weights' ``lazy load + touch`` asks of every tool.

Run: ``python benchmarks/bench_cache_floor.py --repeat 5`` (root for the cold row).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _harness import Result, StateRuns, common_parser, measure, print_results, write_json

BLOCK = 8 << 20
NBYTES_FULL, NBYTES_QUICK = 1 << 30, 64 << 20
WRITE = "bench_cache_floor:write_file"
READERS = 4  # as many as bench_distributed's ranks


def _buffer() -> mmap.mmap:
    block = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    block.write(os.urandom(BLOCK))
    return block


def write_file(path: str, nbytes: int, direct: bool, sync: bool) -> Callable[[], None]:
    """Write ``nbytes`` in 8 MiB calls from one reused buffer, through the page cache or with
    O_DIRECT (``direct``: nothing stays cached); fsync when ``sync``."""
    block = _buffer()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)

    def run() -> None:
        fd = os.open(path, flags, 0o644)
        try:
            for offset in range(0, nbytes, BLOCK):
                os.pwrite(fd, block, offset)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    return run


def read_file(path: str, direct: bool) -> Callable[[], None]:
    """Read the whole file in 8 MiB calls into one reused buffer (O_DIRECT when ``direct``)."""
    block = _buffer()

    def run() -> None:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            offset = 0
            while read := os.preadv(fd, [block], offset):
                offset += read
        finally:
            os.close(fd)

    return run


def _read_in_parts(
    path: str, readers: int, flags: int, buffer: Callable[[int, int, int], memoryview]
) -> Callable[[], None]:
    """A run reading the whole file on ``readers`` threads, each its own contiguous part (whole
    8 MiB blocks), into ``buffer(reader index, offset, end of the part)``."""
    from concurrent.futures import ThreadPoolExecutor

    size = os.path.getsize(path)
    part = -(-size // readers // BLOCK) * BLOCK

    def read_part(index: int) -> None:
        fd = os.open(path, flags)
        try:
            offset, end = index * part, min(size, (index + 1) * part)
            while offset < end and (read := os.preadv(fd, [buffer(index, offset, end)], offset)):
                offset += read
        finally:
            os.close(fd)

    def run() -> None:
        with ThreadPoolExecutor(readers) as pool:
            list(pool.map(read_part, range(readers)))

    return run


def read_file_parallel(path: str, readers: int) -> Callable[[], None]:
    """Read the whole file with O_DIRECT on ``readers`` threads, each its own contiguous part in
    8 MiB calls into a reused buffer: the most the disk gives several readers at once (the
    ceiling of a cold restore by several ranks, whatever the tool)."""
    blocks = [memoryview(_buffer()) for _ in range(readers)]
    return _read_in_parts(
        path, readers, os.O_RDONLY | os.O_DIRECT, lambda index, _offset, _end: blocks[index]
    )


def read_into_memory(path: str, readers: int) -> Callable[[], None]:
    """Copy the whole file into memory touched beforehand (like a model's parameters), on
    ``readers`` threads, each its own contiguous part."""
    size = os.path.getsize(path)
    memory = mmap.mmap(-1, size)
    ones = b"\x01" * BLOCK
    for offset in range(0, size, BLOCK):  # in use, as parameters are: no first touch timed
        memory.write(ones[: size - offset])
    target = memoryview(memory)
    return _read_in_parts(
        path, readers, os.O_RDONLY, lambda _index, offset, end: target[offset:end]
    )


def map_and_touch(path: str) -> Callable[[], None]:
    """Map the file privately with torch and sum its bytes as float32 (every page touched)."""
    import torch

    size = os.path.getsize(path)

    def run() -> None:
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
        raw = torch.empty(0, dtype=torch.uint8).set_(storage)
        raw[: size - size % 4].view(torch.float32).sum()

    return run


def read_back(path: str) -> Callable[[], None]:
    """torchkeep's read-back of the uncached file, until the range reader's residency check
    (``cachestat``, else ``mincore``) finds every page cached."""
    import time

    from torchkeep.storage.cache import refill_after_save, wait_for_refill
    from torchkeep.storage.reading import RangeReader

    size = os.path.getsize(path)

    def run() -> None:
        refill_after_save("auto", [Path(path)])
        wait_for_refill()
        with RangeReader(path) as reader:
            while not reader.cached(0, size):
                time.sleep(0.005)

    return run


def _tensors(nbytes: int) -> dict[str, Any]:
    import torch  # here, so that the floor measurements start without torch

    side = 4096 if nbytes >= NBYTES_FULL else 1024
    count = nbytes // (side * side * 4)
    return {f"layer{i}.weight": torch.randn(side, side) for i in range(count)}


def safetensors_save(path: str, nbytes: int) -> Callable[[], None]:
    """``save_file`` then fsync, as bench_weights measures safetensors' durable save."""
    from safetensors.torch import save_file

    tensors = _tensors(nbytes)

    def run() -> None:
        save_file(tensors, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    return run


def safetensors_load(path: str) -> Callable[[], None]:
    """``load_file`` and touch every tensor."""
    from safetensors.torch import load_file

    def run() -> None:
        for tensor in load_file(path).values():
            tensor.sum()

    return run


def _floors(folder: Path, nbytes: int, repeat: int) -> list[Result]:
    runs = StateRuns()
    case = f"{nbytes >> 20} MiB"
    plain, st = str(folder / "floor.bin"), str(folder / "floor.safetensors")
    for _ in range(repeat):  # interleaved, so a noisy minute hits every row alike
        for operation, sync in [("cached write", False), ("cached write + fsync", True)]:
            run = measure(WRITE, path=plain, nbytes=nbytes, direct=False, sync=sync)
            runs.add(case, nbytes, operation, "", "floor", run)
            os.unlink(plain)
        run = measure(WRITE, path=plain, nbytes=nbytes, direct=True, sync=True)
        runs.add(case, nbytes, "direct write + fsync", "", "floor", run)
        # the file the direct write just wrote is not cached: this is the load after a direct save
        run = measure("bench_cache_floor:read_file", path=plain, direct=True)
        runs.add(case, nbytes, "read, not cached (direct)", "", "floor", run)
        run = measure("bench_cache_floor:read_file_parallel", path=plain, readers=READERS)
        runs.add(case, nbytes, f"read, not cached (direct, {READERS} readers)", "", "floor", run)
        run = measure("bench_cache_floor:read_back", path=plain)  # still not cached: direct read
        runs.add(case, nbytes, "read back into the cache (auto)", "", "torchkeep", run)
        run = measure("bench_cache_floor:read_file", path=plain, direct=False, warm=[plain])
        runs.add(case, nbytes, "read, cached", "", "floor", run)
        run = measure("bench_cache_floor:read_into_memory", path=plain, readers=2, warm=[plain])
        runs.add(case, nbytes, "read, cached, into memory (2 threads)", "", "floor", run)
        run = measure("bench_cache_floor:map_and_touch", path=plain, warm=[plain])
        runs.add(case, nbytes, "map + touch, cached", "", "floor", run)
        os.unlink(plain)
        run = measure("bench_cache_floor:safetensors_save", path=st, nbytes=nbytes)
        runs.add(case, nbytes, "durable save", "", "safetensors", run)
        run = measure("bench_cache_floor:safetensors_load", path=st)
        runs.add(case, nbytes, "load right after its save", "", "safetensors", run)
        os.unlink(st)
    return runs.results()


def _verdict(results: list[Result]) -> None:
    time = {r.operation: r.summary.seconds for r in results}
    keep_save = time["durable save"] / time["cached write + fsync"]
    drop_load = time["load right after its save"] / time["read, not cached (direct)"]
    print(
        f"best possible save that keeps its file cached: {keep_save:.2f}x safetensors' save "
        f"(target 1.5x: {'reachable' if keep_save >= 1.5 else 'out of reach'})"
    )
    print(
        f"best possible load after a save that does not: {drop_load:.2f}x safetensors' load "
        f"right after its save (target 1.0x: {'reachable' if drop_load >= 1.0 else 'out of reach'})"
    )


def main(argv: list[str] | None = None) -> list[Result]:
    """Measure the floors and safetensors' times; print them and the verdict."""
    args = common_parser(__doc__.splitlines()[0]).parse_args(argv)
    folder = args.dir or Path(os.environ.get("TMPDIR", "/tmp")) / "torchkeep-bench-floor"
    folder.mkdir(parents=True, exist_ok=True)
    nbytes = NBYTES_QUICK if args.quick else NBYTES_FULL
    results = _floors(folder, nbytes, args.repeat)
    print_results("cache floors (fresh process each, median)", results, peers=[])
    _verdict(results)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
