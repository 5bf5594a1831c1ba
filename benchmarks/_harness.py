"""Shared benchmark machinery: one measured operation per fresh process, medians, tables.

A benchmark describes an operation as ``"module:factory"`` plus keyword arguments. In a fresh
Python process the factory prepares everything (imports, models, data) and returns a
zero-argument callable; only that callable is timed. Memory is the peak resident set size while
it runs, above the process's resident size just before it started (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``), so it counts what the operation itself allocated or mapped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
SRC_DIR = BENCH_DIR.parent / "src"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
if str(SRC_DIR) not in sys.path:  # benchmark this checkout's code, installed or not
    sys.path.insert(0, str(SRC_DIR))

# Runs in the fresh process: prepare, optionally drop caches, reset the peak, time the call.
_CHILD = r"""
import json, os, sys
from dataclasses import asdict
spec = json.loads(sys.argv[1])
sys.path[:0] = spec["path"]
from _harness import timed
module_name, factory_name = spec["target"].split(":")
module = __import__(module_name)
op = getattr(module, factory_name)(**spec["kwargs"])
os.sync()
if spec["cold"]:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
for root in spec["warm"]:  # read every file once, so the page cache holds it all
    names = [root] if os.path.isfile(root) else [
        os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns]
    for name in names:
        with open(name, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass

print("\n" + json.dumps(asdict(timed(op))))
"""


@dataclass(frozen=True)
class Measurement:
    """One timed operation: wall seconds and peak extra resident memory in bytes."""

    seconds: float
    peak_rss: int


@dataclass(frozen=True)
class Summary:
    """Medians over repeated runs of one operation, with the spread of the times."""

    seconds: float
    peak_rss: int
    runs: list[float]

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: how noisy the runs were."""
        return (max(self.runs) - min(self.runs)) / self.seconds if self.seconds else 0.0


def _status(field: str) -> int:
    """``field`` of ``/proc/self/status`` in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def timed(call: Callable[[], object], ready: Callable[[], object] | None = None) -> Measurement:
    """Run ``call`` once in this process: its wall time and the peak resident memory it added
    (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; 0 where those are missing).

    Garbage is collected first, so what earlier work left to the collector is not this call's;
    ``ready`` (a barrier between processes) runs after that and before the clock starts.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    baseline = _status("VmRSS")
    if ready is not None:
        ready()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return Measurement(seconds, max(_status("VmHWM") - baseline, 0))


def measure(
    target: str, *, cold: bool = False, warm: Sequence[str] = (), **kwargs: object
) -> Measurement:
    """Run the operation ``target`` (``"module:factory"``) once in a fresh Python process.

    Args:
        target: a module importable from ``benchmarks/`` and a factory in it; the factory gets
            ``kwargs`` and returns the zero-argument callable to time.
        cold: drop the page cache (needs root) after preparing and before timing.
        warm: files or folders to read whole after preparing and before timing, so that the
            page cache holds them.
        **kwargs: JSON-serialisable arguments for the factory.

    Returns:
        The wall time of the call and its peak resident memory above the baseline.

    Example:
        >>> measure("bench_weights:lazy_load", tool="torch", path="/tmp/w.pt", case="small",
        ...         quick=True)
    """
    path = [str(BENCH_DIR), str(SRC_DIR)]
    spec = {"path": path, "target": target, "kwargs": kwargs, "cold": cold, "warm": list(warm)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{target}({kwargs}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Measurement(result["seconds"], result["peak_rss"])


def summarize(runs: Sequence[Measurement]) -> Summary:
    """Medians of ``runs`` of one operation."""
    seconds = [run.seconds for run in runs]
    peak = int(statistics.median(run.peak_rss for run in runs))
    return Summary(statistics.median(seconds), peak, seconds)


def repeat(target: str, *, times: int, **kwargs: object) -> Summary:
    """Measure ``target`` ``times`` times, each in its own process; return the medians."""
    return summarize([measure(target, **kwargs) for _ in range(times)])


def can_drop_caches() -> bool:
    """True when this process may drop the page cache (root, writable ``/proc/sys``)."""
    try:
        os.sync()
        DROP_CACHES.write_text("1")
    except OSError:
        return False
    return True


AFTER_SAVE, COLD, WARM = "right after save", "cold", "warm"
STATES = (AFTER_SAVE, COLD, WARM)
"""The page-cache states a load is measured in: the file as its own save left the cache, the
page cache dropped (root only), and the file read once before."""


def cold_note() -> str | None:
    """Why cold loads cannot be measured here, or None when they can."""
    if can_drop_caches():
        return None
    return (
        "cold rows skipped: dropping the page cache needs root (write access to "
        f"{DROP_CACHES}); run as root to measure them"
    )


class StateRuns:
    """Collects the runs of each (case, operation, state, tool), in any order, for medians."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str, str, str], list[Measurement]] = {}
        self._bytes: dict[str, int] = {}

    def add(
        self, case: str, nbytes: int, operation: str, state: str, tool: str, run: Measurement
    ) -> None:
        """Record one run."""
        self._bytes[case] = nbytes
        self._runs.setdefault((case, operation, state, tool), []).append(run)

    def results(self) -> list[Result]:
        """Medians per (case, operation, state, tool), in the order first recorded."""
        return [
            Result(case, operation, tool, self._bytes[case], summarize(runs), state)
            for (case, operation, state, tool), runs in self._runs.items()
        ]


def print_states(title: str, results: Sequence[Result], tools: Sequence[str]) -> None:
    """One row per (case, operation, state): each tool's median time, the first tool's speed
    ratio to each other tool (other time / first time: above 1 means the first is faster) and
    each tool's peak extra memory."""
    measured = {r.tool for r in results}
    tools = [tool for tool in tools if tool in measured]  # columns only for tools that ran
    peers = tools[1:]
    found = {(r.case, r.operation, r.state, r.tool): r.summary for r in results}
    rows = list(dict.fromkeys((r.case, r.operation, r.state) for r in results))
    table = Table(title=title, title_justify="left")
    for column in ["case", "operation", "cache state"]:
        table.add_column(column)
    for column in [*(f"{t} s" for t in tools), *(f"vs {p}" for p in peers), "peak MiB", "spread"]:
        table.add_column(column, justify="right")
    for case, operation, state in rows:
        got = [found.get((case, operation, state, tool)) for tool in tools]
        times = [f"{s.seconds:.3f}" if s else "—" for s in got]
        first = got[0]
        ratios = [ratio(s.seconds, first.seconds) if s and first else "—" for s in got[1:]]
        peaks = " / ".join(f"{s.peak_rss / 2**20:.0f}" if s else "—" for s in got)
        spread = max((s.spread for s in got if s), default=0.0)
        table.add_row(case, operation, state, *times, *ratios, peaks, f"{spread:.0%}")
    Console(width=320, highlight=False).print(table)  # wide enough that no header is cut
    print(f"peak MiB: extra resident memory, {' / '.join(tools)}; spread: (max - min) / median")


def common_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script accepts (``run.py`` passes them through)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per operation (median)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder for the files")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    return parser


@dataclass(frozen=True)
class Result:
    """One operation of one tool on one case, measured (in one page-cache ``state``)."""

    case: str
    operation: str
    tool: str
    nbytes: int
    summary: Summary
    state: str = ""


def ratio(peer_seconds: float | None, seconds: float) -> str:
    """``peer time / this time`` as ``'2.31x'`` (above 1: this one is faster)."""
    return "—" if peer_seconds is None else f"{peer_seconds / seconds:.2f}x"


def print_results(title: str, results: Sequence[Result], peers: Sequence[str]) -> None:
    """Print one table row per result, with its speed ratio to each of ``peers``."""
    times = {(r.case, r.operation, r.tool): r.summary.seconds for r in results}
    columns = ["case", "operation", "tool", "s (median)", "GB/s", "peak RSS MiB", "spread"]
    columns += [f"vs {peer}" for peer in peers]
    rows = []
    for r in results:
        s = r.summary
        gbps = r.nbytes / s.seconds / 1e9
        cells = [r.case, r.operation, r.tool, f"{s.seconds:.3f}", f"{gbps:.2f}"]
        cells += [f"{s.peak_rss / 2**20:.0f}", f"{s.spread:.0%}"]
        cells += [ratio(times.get((r.case, r.operation, peer)), s.seconds) for peer in peers]
        rows.append(cells)
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in columns[3:] else "left")
    for cells in rows:
        table.add_row(*cells)
    Console(width=160, highlight=False).print(table)


def write_json(path: Path, results: Sequence[Result]) -> None:
    """Write ``results`` (every run's time included) as JSON to ``path``."""
    path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
