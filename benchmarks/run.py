"""Run every ``benchmarks/bench_*.py`` (``make bench``), or those whose name contains a filter.

Usage: ``python benchmarks/run.py [NAME ...] [--quick] [--repeat N] [--json PATH]``.
Options after the names are passed to each script's ``main``; ``--json PATH`` collects the
results of all scripts in one file, keyed by script name.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR), str(BENCH_DIR.parent / "src")]


def scripts(filters: list[str]) -> list[str]:
    """Module names of the benchmark scripts whose name contains one of ``filters`` (or all)."""
    names = sorted(path.stem for path in BENCH_DIR.glob("bench_*.py"))
    return [name for name in names if not filters or any(f in name for f in filters)]


def main(argv: list[str] | None = None) -> int:
    """Run the selected scripts one after the other; return 0, or 2 when none matched."""
    argv = sys.argv[1:] if argv is None else argv
    split = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    filters, passed = argv[:split], argv[split:]
    json_path = None
    if "--json" in passed:
        at = passed.index("--json")
        json_path = Path(passed[at + 1])
        passed = passed[:at] + passed[at + 2 :]
    selected = scripts(filters)
    if not selected:
        print(f"no benchmark matches {filters}; have {scripts([])}", file=sys.stderr)
        return 2
    collected = {}
    for name in selected:
        print(f"== {name}", flush=True)
        results = importlib.import_module(name).main(passed)
        if results is not None:  # scripts that return Result rows feed --json
            collected[name] = [asdict(result) for result in results]
    if json_path is not None:
        json_path.write_text(json.dumps(collected, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
