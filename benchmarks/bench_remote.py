"""Saving weights to S3 (a moto server on loopback): torchkeep against s3fs.put and DCP.

    python benchmarks/bench_remote.py [--repeat 3] [--quick] [--mib N]

One state dict of ``--mib`` MiB (8 float32 tensors; ``--quick``: 16 MiB) is saved to a fresh
key of one moto S3 server, started on a free 127.0.0.1 port, by

- ``torchkeep``: ``tk.save_weights(state, "s3://...", transfer=tk.Transfer(...))``, one
  multipart upload streamed from the tensors' memory, parts in parallel;
- ``s3fs.put``: ``fs.put`` of the very same safetensors bytes from a local file (written before
  the clock starts);
- ``DCP``: ``dcp.save`` through DCP's ``FsspecWriter`` (single process, no process group).

Figures are the median of ``--repeat`` runs, tools alternating within each run; the ratio is
the peer's time over torchkeep's (above 1: torchkeep is faster). Then one more torchkeep save
goes through the fault proxy (forwarding only) to count the UploadPart requests in flight at
once. moto is Python and tops out near 50-75 MiB/s on this machine, so this measures the
overhead and parallelism of each client against one server, not real S3 or GCS throughput.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _harness import BENCH_DIR, Result, Summary, common_parser

sys.path.insert(0, str(BENCH_DIR.parent))  # the moto launcher and proxy of the test suite

TOOLS = ("torchkeep", "s3fs.put", "DCP FsspecWriter")
PART_SIZE = 8 << 20
CONCURRENCY = 8


def _state(mib: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    rows = (mib << 20) // 4 // 8 // 1024
    return {f"layer{i}.weight": torch.randn(rows, 1024) for i in range(8)}


def _savers(
    state: dict[str, Any], options: dict[str, Any], bucket: str, scratch: Path
) -> dict[str, Callable[[int], None]]:
    """One callable per tool; each writes run ``n`` under its own fresh key."""
    import fsspec
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    import torchkeep as tk

    transfer = tk.Transfer(part_size=PART_SIZE, max_concurrency=CONCURRENCY)
    local = Path(tk.save_weights(state, scratch / "state.safetensors"))
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)

    def torchkeep(n: int) -> None:
        url = f"s3://{bucket}/torchkeep-{n}.safetensors"
        tk.save_weights(state, url, storage_options=options, transfer=transfer)

    def s3fs_put(n: int) -> None:
        fs.put(str(local), f"{bucket}/s3fs-{n}.safetensors")

    def dcp(n: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns that no process group is initialised
            dcp_save(state, storage_writer=FsspecWriter(f"s3://{bucket}/dcp-{n}", **options))

    return {"torchkeep": torchkeep, "s3fs.put": s3fs_put, "DCP FsspecWriter": dcp}


def _parts_in_flight(state: dict[str, Any], endpoint: str, bucket: str) -> int:
    """The most UploadPart requests one torchkeep save had in flight at once (via the proxy)."""
    from tests.remote.proxy import fault_proxy
    from tests.remote.server import s3_options

    import torchkeep as tk

    transfer = tk.Transfer(part_size=PART_SIZE, max_concurrency=CONCURRENCY)
    with fault_proxy(endpoint) as proxy:
        url = f"s3://{bucket}/proxied.safetensors"
        tk.save_weights(state, url, storage_options=s3_options(proxy.endpoint), transfer=transfer)
        return proxy.max_parts_in_flight


def main(argv: list[str] | None = None) -> list[Result]:
    """Run the comparison and print one table; returns the rows (for ``--json``)."""
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB (default 256)")
    args: argparse.Namespace = parser.parse_args(argv)
    mib = 16 if args.quick else args.mib
    from tests.remote.server import DUMMY_ENV, create_bucket, moto_server, s3_options

    os.environ.update(DUMMY_ENV)
    state = _state(mib)
    nbytes = sum(t.nbytes for t in state.values())
    times: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    with moto_server() as endpoint, tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        bucket = create_bucket(endpoint)
        savers = _savers(state, s3_options(endpoint), bucket, Path(scratch))
        for n in range(args.repeat):
            for tool in TOOLS:
                start = time.perf_counter()
                savers[tool](n)
                times[tool].append(time.perf_counter() - start)
        in_flight = _parts_in_flight(state, endpoint, bucket)
    ours = statistics.median(times["torchkeep"])
    print(f"save of {mib} MiB to moto S3 on loopback, median of {args.repeat} run(s)")
    print(f"{'tool':>18} {'seconds':>8} {'MiB/s':>7} {'peer/torchkeep':>15}  runs")
    results = []
    for tool in TOOLS:
        median = statistics.median(times[tool])
        ratio = "" if tool == "torchkeep" else f"{median / ours:.2f}x"
        runs = [round(t, 2) for t in times[tool]]
        print(f"{tool:>18} {median:>8.2f} {mib / median:>7.1f} {ratio:>15}  {runs}")
        summary = Summary(seconds=median, peak_rss=0, runs=times[tool])
        results.append(Result(f"{mib} MiB", "save to s3", tool, nbytes, summary))
    print(
        f"torchkeep had up to {in_flight} UploadPart requests in flight at once "
        f"(part_size {PART_SIZE >> 20} MiB, max_concurrency {CONCURRENCY}; counted by the proxy)"
    )
    print(
        "note: moto is a Python server that tops out near 50-75 MiB/s here, so these figures "
        "compare clients against one slow server; real S3/GCS throughput is not measured"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
