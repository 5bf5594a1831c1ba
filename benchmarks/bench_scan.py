"""Speed of ``tk.scan``'s pickle walk, in opcodes and megabytes per second.

Three cases, each scanned in a fresh process (see ``_harness``):

- ``torch-model``: ``torch.save`` of a state dict with many tensors (20,000; 2,000 quick), the
  pickle every torch-file reader walks before loading;
- ``records``: a large synthetic pickle of small dicts, strings and lists (~100 MB; ~10 MB
  quick), opcode after opcode with no long runs;
- ``floats``: a list of floats (~90 MB; ~9 MB quick), long runs of plain values.

``torchkeep`` is ``tk.scan(path)``; ``pickletools`` only iterates ``pickletools.genops`` over
the same pickle (what the scanner was built on before, without any analysis), for scale.
Opcode counts come from ``pickletools``. Run alone (``python benchmarks/bench_scan.py
--quick``) or through ``benchmarks/run.py``.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from _harness import Result, common_parser, print_results, repeat, write_json

TOOLS = ("torchkeep", "pickletools")
CASES = ("torch-model", "records", "floats")


def build(case: str, path: Path, quick: bool) -> None:
    """Write the file of ``case`` to ``path``."""
    if case == "torch-model":
        import torch

        count = 2_000 if quick else 20_000
        torch.save({f"layers.{i}.weight": torch.zeros(4, 4) for i in range(count)}, path)
        return
    scale = 1 if quick else 10
    if case == "records":
        value: object = [
            {"id": i, "name": f"row{i}", "score": i * 0.5, "tags": [i, i + 1, None, True]}
            for i in range(150_000 * scale)
        ]
    else:
        value = [float(i) for i in range(1_000_000 * scale)]
    path.write_bytes(pickle.dumps(value, protocol=2))


def pickle_bytes(path: Path) -> bytes:
    """The pickle the scanner walks: the file itself, or a torch zip's ``data.pkl``."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            return archive.read(name)
    return path.read_bytes()


# --- operations: each factory runs in a fresh process and returns the callable to time ---------


def scan(tool: str, path: str) -> Callable[[], None]:
    """Walk the pickle of ``path`` with ``tool``."""
    if tool == "torchkeep":
        import torchkeep as tk

        def walk() -> None:
            tk.scan(path)

        return walk
    data = pickle_bytes(Path(path))

    def genops() -> None:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass

    return genops


def main(argv: list[str] | None = None) -> list[Result]:
    """Scan each case with each tool; print seconds, opcodes/s and MB/s."""
    args = common_parser(__doc__.splitlines()[0]).parse_args(argv)
    results = []
    rates = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for case in CASES:
            path = Path(tmp) / f"{case}.{'pt' if case == 'torch-model' else 'pkl'}"
            build(case, path, args.quick)
            data = pickle_bytes(path)
            opcodes = sum(1 for _ in pickletools.genops(io.BytesIO(data)))
            for tool in TOOLS:
                summary = repeat("bench_scan:scan", times=args.repeat, tool=tool, path=str(path))
                results.append(Result(case, "scan", tool, len(data), summary))
                rates.append(
                    f"{case:12} {tool:12} {opcodes:>12,} opcodes {len(data) / 1e6:8.1f} MB  "
                    f"{opcodes / summary.seconds / 1e6:6.2f} M opcodes/s  "
                    f"{len(data) / summary.seconds / 1e6:7.1f} MB/s  "
                    f"{summary.seconds / (len(data) / 1e6):.3f} s/MB"
                )
    print_results("tk.scan: pickle walk", results, peers=["pickletools"])
    print("\n".join(rates))
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
