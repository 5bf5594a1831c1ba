"""torchkeep's weights layer against torch.save/torch.load and safetensors, side by side.

Two cases: ``large`` (~1 GiB float32 in 32 tensors) and ``small`` (20,000 tensors, ~300 MiB).
Each operation runs in a fresh process (see ``_harness``):

- save (fsync): durable saves; torchkeep's ``save_weights`` (temp file, fsync, rename) against
  the peers' save followed by an fsync of the file;
- save (no fsync): the same calls without any fsync, as the peers are usually run (torchkeep's
  atomic write with its fsyncs switched off inside the benchmark process);
- load into model: ``load_weights(model, p)`` against ``model.load_state_dict(peer_load(p))``;
- lazy load + touch: ``load_state_dict(p)`` against the peers' loaders, each followed by a
  ``sum()`` of every tensor so lazily mapped data is really read.

Run alone (``python benchmarks/bench_weights.py --quick``) or through ``benchmarks/run.py``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _harness import Result, common_parser, print_results, repeat, resolve_cold, write_json
from torchkeep import load_state_dict, load_weights, save_weights, weights
from torchkeep.storage import local

TOOLS = ("torchkeep", "torch", "safetensors")
SUFFIX = {"torchkeep": ".safetensors", "torch": ".pt", "safetensors": ".st.safetensors"}
_SMALL_ROWS = (1, 32, 64, 96, 128, 48, 80, 16, 112, 37)  # x 64 float32: ~15.7 KB on average


def shapes(case: str, quick: bool) -> list[tuple[int, ...]]:
    """Tensor shapes of a case: ``large`` 32 x 32 MiB (1 MiB quick), ``small`` 20,000 (2,000)."""
    if case == "large":
        return [(2048, 4096 if not quick else 128)] * 32
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


def save(tool: str, path: str, case: str, quick: bool, durable: bool) -> Callable[[], None]:
    """Save a model's state dict with ``tool`` to ``path`` (fsynced when ``durable``)."""
    model = build_model(case, quick)
    Path(path).unlink(missing_ok=True)
    if not durable:  # the public call with its atomic write's fsyncs switched off
        weights.atomic_file = functools.partial(local.atomic_file, durable=False)
    writers: dict[str, Callable[[], object]] = {
        "torchkeep": lambda: save_weights(model, path),
        "torch": lambda: torch.save(model.state_dict(), path),
        "safetensors": lambda: save_file(model.state_dict(), path),
    }

    def run() -> None:
        writers[tool]()
        if durable and tool != "torchkeep":
            local.fsync_file(Path(path))

    return run


def load_into_model(tool: str, path: str, case: str, quick: bool) -> Callable[[], None]:
    """Fill an existing model's parameters from ``path`` the way ``tool`` is used for that."""
    model = build_model(case, quick, filled=False)
    loaders: dict[str, Callable[[], object]] = {
        "torchkeep": lambda: load_weights(model, path),
        "torch": lambda: model.load_state_dict(torch.load(path, weights_only=True)),
        "safetensors": lambda: model.load_state_dict(load_file(path)),
    }

    def run() -> None:
        loaders[tool]()

    return run


def lazy_load(tool: str, path: str, case: str, quick: bool) -> Callable[[], None]:
    """Load a state dict from ``path`` with ``tool``, then sum every tensor (reads all data)."""
    loaders: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        "torchkeep": lambda: load_state_dict(path),
        "torch": lambda: torch.load(path, weights_only=True),
        "safetensors": lambda: load_file(path),
    }

    def run() -> None:
        for tensor in loaders[tool]().values():
            tensor.sum()

    return run


# --- driver ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[Result]:
    """Run every operation on both cases; print a table; return the results."""
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["large", "small"], action="append", default=None)
    parser.add_argument("--op", action="append", default=None, help="only operations named so")
    args = parser.parse_args(argv)
    cold = resolve_cold(args.cold)
    folder: Path = args.dir or Path(os.environ.get("TMPDIR", "/tmp")) / "torchkeep-bench"
    folder.mkdir(parents=True, exist_ok=True)
    measured = functools.partial(repeat, times=args.repeat, cold=cold, quick=args.quick)
    results: list[Result] = []
    for case in args.case or ["large", "small"]:
        nbytes = payload_bytes(case, args.quick)
        files = {tool: str(folder / f"{case}{SUFFIX[tool]}") for tool in TOOLS}
        plan = [
            ("save (no fsync)", "bench_weights:save", {"durable": False}),
            ("save (fsync)", "bench_weights:save", {"durable": True}),
            ("load into model", "bench_weights:load_into_model", {}),
            ("lazy load + touch", "bench_weights:lazy_load", {}),
        ]
        for operation, target, extra in plan:
            if args.op and not any(part in operation for part in args.op):
                continue
            for tool in TOOLS:
                print(f"  {case:5} {operation:17} {tool}", flush=True)
                summary = measured(target, tool=tool, path=files[tool], case=case, **extra)
                results.append(Result(case, operation, tool, nbytes, summary))
    title = f"weights, {'cold' if cold else 'warm'} cache, median of {args.repeat} runs"
    print_results(title, results, peers=TOOLS[1:])
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
