"""torchkeep's weights layer against torch.save/torch.load and safetensors, in three cache states.

Two cases: ``large`` (1 GiB: 16 float32 tensors of 4096 x 4096) and ``small`` (20,000 tensors,
~300 MiB). Every operation runs in a fresh process (see ``_harness``):

- durable save: ``save_weights`` (temp file, fsync, rename; the default ``cache="auto"``)
  against the peers' save followed by an fsync of the file; ``torchkeep drop`` is
  ``save_weights(..., cache="drop")`` (direct I/O, nothing left in the page cache) and
  ``torchkeep keep`` is ``cache="keep"`` (everything left in the page cache);
- load into model: ``load_weights(model, p)`` against ``model.load_state_dict(peer_load(p))``;
- lazy load + touch: ``load_state_dict(p)`` against the peers' loaders, each followed by a
  ``sum()`` of every tensor so lazily mapped data is really read; ``safe_open`` is
  safetensors' lazy reader (``get_tensor`` of each name in turn, on the file ``save_file``
  wrote), measured for this operation only.

Each load is measured in three page-cache states: right after the save (each tool loads the
file it has just saved, the cache as that save left it), cold (the page cache dropped first:
root only, the rows are skipped otherwise) and warm (the file read once first).

Run alone (``python benchmarks/bench_weights.py --quick``) or through ``benchmarks/run.py``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

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
from torchkeep import load_state_dict, load_weights, save_weights
from torchkeep.storage import local

TOOLS = ("torchkeep", "safetensors", "torch", "torchkeep drop", "torchkeep keep", "safe_open")
SUFFIX = {
    "torchkeep": ".safetensors",
    "torchkeep drop": ".drop.safetensors",
    "torchkeep keep": ".keep.safetensors",
    "torch": ".pt",
    "safetensors": ".st.safetensors",
    "safe_open": ".so.safetensors",
}
SAVE, LOAD_INTO, LAZY = "durable save", "load into model", "lazy load + touch"
_SMALL_ROWS = (1, 32, 64, 96, 128, 48, 80, 16, 112, 37)  # x 64 float32: ~15.7 KB on average


def shapes(case: str, quick: bool) -> list[tuple[int, ...]]:
    """Tensor shapes of a case: ``large`` 16 x 64 MiB (2 MiB quick), ``small`` 20,000 (2,000)."""
    if case == "large":
        return [(4096 if not quick else 128, 4096)] * 16
    count = 2_000 if quick else 20_000
    return [(_SMALL_ROWS[i % len(_SMALL_ROWS)], 64) for i in range(count)]


def build_model(case: str, quick: bool, *, filled: bool = True) -> nn.Module:
    """A module tree with one float32 parameter per shape, ten per block (memory touched)."""
    root = nn.Module()
    blocks = nn.ModuleList()
    all_shapes = shapes(case, quick)
    for start in range(0, len(all_shapes), 10):
        block = nn.Module()
        for j, shape in enumerate(all_shapes[start : start + 10]):
            value = float(start + j) if filled else 0.0
            block.register_parameter(f"w{j}", nn.Parameter(torch.full(shape, value)))
        blocks.append(block)
    root.blocks = blocks
    return root


def payload_bytes(case: str, quick: bool) -> int:
    """Bytes of tensor data in a case."""
    total = 0
    for shape in shapes(case, quick):
        numel = 1
        for dim in shape:
            numel *= dim
        total += numel * 4
    return total


# --- operations: each factory runs in a fresh process and returns the callable to time ---------


def save(tool: str, path: str, case: str, quick: bool) -> Callable[[], None]:
    """Durably save a model's state dict with ``tool`` to ``path``."""
    model = build_model(case, quick)
    Path(path).unlink(missing_ok=True)
    writers: dict[str, Callable[[], object]] = {
        "torchkeep": lambda: save_weights(model, path),
        "torchkeep drop": lambda: save_weights(model, path, cache="drop"),
        "torchkeep keep": lambda: save_weights(model, path, cache="keep"),
        "torch": lambda: torch.save(model.state_dict(), path),
        "safetensors": lambda: save_file(model.state_dict(), path),
        "safe_open": lambda: save_file(model.state_dict(), path),
    }

    def run() -> None:
        writers[tool]()
        if not tool.startswith("torchkeep"):  # torchkeep's save fsyncs the file and folder
            local.fsync_file(Path(path))
            local.fsync_dir(Path(path).parent)

    return run


def load_into_model(tool: str, path: str, case: str, quick: bool) -> Callable[[], None]:
    """Fill an existing model's parameters from ``path`` the way ``tool`` is used for that."""
    model = build_model(case, quick, filled=False)
    loaders: dict[str, Callable[[], object]] = {
        "torch": lambda: model.load_state_dict(torch.load(path, weights_only=True)),
        "safetensors": lambda: model.load_state_dict(load_file(path)),
    }
    load = loaders.get(tool, lambda: load_weights(model, path))

    def run() -> None:
        load()

    return run


def lazy_load(tool: str, path: str, case: str, quick: bool) -> Callable[[], None]:
    """Load a state dict from ``path`` with ``tool``, then sum every tensor (reads all data)."""

    def lazily() -> Iterator[torch.Tensor]:
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                yield f.get_tensor(name)

    loaders: dict[str, Callable[[], Iterable[torch.Tensor]]] = {
        "torch": lambda: torch.load(path, weights_only=True).values(),
        "safetensors": lambda: load_file(path).values(),
        "safe_open": lazily,
    }
    load = loaders.get(tool, lambda: load_state_dict(path).values())

    def run() -> None:
        for tensor in load():
            tensor.sum()

    return run


# --- driver ------------------------------------------------------------------------------------

_TARGETS = {LOAD_INTO: "bench_weights:load_into_model", LAZY: "bench_weights:lazy_load"}


def _plan(tool: str, operations: list[str], states: list[str]) -> list[tuple[str, str]]:
    """(operation, state) pairs to measure for ``tool``; ``torchkeep drop`` and ``torchkeep
    keep`` differ from ``torchkeep`` only in how they save, so they are loaded only right
    after their own save;
    ``safe_open`` is a lazy reader, measured only for the lazy load."""
    if tool in ("torchkeep drop", "torchkeep keep"):
        states = [state for state in states if state == AFTER_SAVE]
    if tool == "safe_open":
        operations = [op for op in operations if op == LAZY]
    return [(op, state) for state in states for op in operations]


def run_case(
    case: str,
    *,
    quick: bool,
    repeats: int,
    folder: Path,
    operations: list[str],
    states: list[str],
    tools: list[str],
) -> list[Result]:
    """Measure every tool on ``case``: each load after its own fresh save, cold and warm."""
    nbytes = payload_bytes(case, quick)
    runs = StateRuns()
    common = {"case": case, "quick": quick}
    for _ in range(repeats):
        for tool in tools:
            path = str(folder / f"{case}{'-quick' if quick else ''}{SUFFIX[tool]}")
            args = {"tool": tool, "path": path, **common}
            for operation, state in _plan(tool, operations, states):
                if state == AFTER_SAVE or not Path(path).exists():
                    print(f"  {case:5} {SAVE:17} {tool}", flush=True)
                    saved = measure("bench_weights:save", **args)
                    if tool != "safe_open":  # the same save_file as safetensors' row
                        runs.add(case, nbytes, SAVE, "", tool, saved)
                print(f"  {case:5} {operation:17} {state:16} {tool}", flush=True)
                warm = [path] if state == WARM else []
                run = measure(_TARGETS[operation], cold=state == COLD, warm=warm, **args)
                runs.add(case, nbytes, operation, state, tool, run)
    return runs.results()


def main(argv: list[str] | None = None) -> list[Result]:
    """Run every operation on both cases in every cache state; print a table; return results."""
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["large", "small"], action="append", default=None)
    parser.add_argument("--op", choices=[LOAD_INTO, LAZY], action="append", default=None)
    parser.add_argument("--state", choices=[AFTER_SAVE, COLD, WARM], action="append")
    parser.add_argument("--tool", choices=TOOLS, action="append", default=None)
    args = parser.parse_args(argv)
    states = args.state or [AFTER_SAVE, COLD, WARM]
    note = cold_note()
    if note and COLD in states:
        print(f"note: {note}")
        states.remove(COLD)
    folder: Path = args.dir or Path(os.environ.get("TMPDIR", "/tmp")) / "torchkeep-bench"
    folder.mkdir(parents=True, exist_ok=True)
    run = functools.partial(
        run_case,
        quick=args.quick,
        repeats=args.repeat,
        folder=folder,
        operations=args.op or [LOAD_INTO, LAZY],
        states=states,
        tools=args.tool or list(TOOLS),
    )
    results = [result for case in args.case or ["large", "small"] for result in run(case)]
    print_states(f"weights, median of {args.repeat} runs", results, TOOLS)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
