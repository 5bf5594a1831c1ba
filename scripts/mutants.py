"""Standing mutation check: every promise in tests/mutations.toml must be guarded by a test.

Each mutation is applied to a fresh temporary copy of ``src/`` (the working tree is never
touched), and the tests it names run against that copy (``PYTHONPATH`` points at it). A
mutation must make those tests fail ("killed"); one that passes them "survived", and the run
fails. The run also fails when a mutation's original text is not found in its file exactly as
many times as it says (once by default): a refactor then forces the list to be re-targeted
instead of silently testing nothing. Before any mutation, the union of the named tests runs
against an unmutated copy: a test that already fails would kill every mutation for nothing.

Usage:
    python scripts/mutants.py [--jobs 2] [--only NAME ...] [--check] [--no-baseline]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "tests" / "mutations.toml"
TIMEOUT_S = 900
# pytest exit codes: 0 passed, 1 tests failed; the others (interrupted or a collection error,
# internal error, usage error, no tests collected) are errors of the run, never a kill.
KILLED_CODES = (1,)


@dataclass(frozen=True)
class Edit:
    original: str
    replacement: str
    count: int


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to src/
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest arguments
    intent: str


@dataclass(frozen=True)
class Outcome:
    name: str
    verdict: str  # killed | survived | timeout (killed) | error
    seconds: float
    detail: str = ""


def load_mutations(path: Path = LIST) -> list[Mutation]:
    """Parse the mutation list; each entry has one edit or an ``edits`` array of them."""
    data = tomllib.loads(path.read_text())
    mutations = []
    for raw in data["mutation"]:
        edits_raw = raw.get("edits") or [raw]
        edits = tuple(
            Edit(e["original"], e["replacement"], int(e.get("count", 1))) for e in edits_raw
        )
        mutations.append(
            Mutation(raw["name"], raw["file"], edits, tuple(raw["tests"]), raw["intent"])
        )
    names = [m.name for m in mutations]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SystemExit(f"{path}: duplicate mutation names {sorted(duplicates)}")
    return mutations


def apply(mutation: Mutation, src: Path) -> str:
    """Apply ``mutation`` to the copy ``src``; return a problem, or "" when it applied."""
    target = src / mutation.file
    if not target.is_file():
        return f"{mutation.file} does not exist"
    text = target.read_text()
    for edit in mutation.edits:
        found = text.count(edit.original)
        if found != edit.count:
            first = edit.original.strip().splitlines()[0] if edit.original.strip() else "''"
            return (
                f"original text found {found} times in {mutation.file} (expected {edit.count}): "
                f"{first!r}; re-target the mutation"
            )
        text = text.replace(edit.original, edit.replacement)
    try:
        compile(text, str(target), "exec")
    except SyntaxError as exc:
        return f"the mutated {mutation.file} does not compile ({exc}); fix the replacement"
    target.write_text(text)
    return ""


def run_tests(tests: tuple[str, ...], src: Path) -> tuple[int, str]:
    """Run pytest on ``tests`` with ``src`` first on the path; (exit code, output tail)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S}s"
    return done.returncode, (done.stdout + done.stderr)[-2000:]


def _copy_src(into: Path) -> Path:
    copy = into / "src"
    shutil.copytree(ROOT / "src", copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return copy


def check_copy_is_used(src: Path) -> None:
    """Fail unless ``import torchkeep`` resolves to the copy (not an installed tree)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    found = subprocess.run(
        [sys.executable, "-c", "import torchkeep; print(torchkeep.__file__)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"torchkeep is imported from {found}, not from the copy {src}")


def run_mutation(mutation: Mutation) -> Outcome:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tk-mutant-") as tmp:
        src = _copy_src(Path(tmp))
        problem = apply(mutation, src)
        if problem:
            return Outcome(mutation.name, "error", time.monotonic() - start, problem)
        code, output = run_tests(mutation.tests, src)
    seconds = time.monotonic() - start
    if code == 0:
        return Outcome(mutation.name, "survived", seconds, output)
    if code == -1:
        return Outcome(mutation.name, "timeout (killed)", seconds, output)
    if code in KILLED_CODES:
        return Outcome(mutation.name, "killed", seconds)
    return Outcome(mutation.name, "error", seconds, f"pytest exit code {code}\n{output}")


def baseline(mutations: list[Mutation]) -> None:
    """The named tests, all together, must pass on an unmutated copy."""
    tests = sorted({t for m in mutations for t in m.tests if t.startswith("tests/")})
    with tempfile.TemporaryDirectory(prefix="tk-mutant-") as tmp:
        src = _copy_src(Path(tmp))
        check_copy_is_used(src)
        start = time.monotonic()
        code, output = run_tests(tuple(tests), src)
    print(
        f"baseline: {len(tests)} test files on the unmutated copy, {time.monotonic() - start:.0f}s"
    )
    if code != 0:
        raise SystemExit(f"the baseline fails (exit {code}); fix the tests first:\n{output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="mutations run at once (default 2)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these mutations")
    parser.add_argument("--check", action="store_true", help="only check that all apply")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args(argv)
    mutations = load_mutations()
    if args.only:
        unknown = set(args.only) - {m.name for m in mutations}
        if unknown:
            raise SystemExit(f"unknown mutations: {sorted(unknown)}")
        mutations = [m for m in mutations if m.name in args.only]
    if args.check:
        with tempfile.TemporaryDirectory(prefix="tk-mutant-") as tmp:
            problems = []
            for mutation in mutations:
                src = _copy_src(Path(tmp) / mutation.name)
                problem = apply(mutation, src)
                if problem:
                    problems.append(f"{mutation.name}: {problem}")
        print("\n".join(problems) or f"all {len(mutations)} mutations apply")
        return 1 if problems else 0
    start = time.monotonic()
    if not args.no_baseline:
        baseline(mutations)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(run_mutation, mutations))
    width = max(len(m.name) for m in mutations)
    print(f"\n{'mutation':<{width}}  {'result':<17} seconds")
    for outcome in outcomes:
        print(f"{outcome.name:<{width}}  {outcome.verdict:<17} {outcome.seconds:7.1f}")
    failed = [o for o in outcomes if o.verdict in ("survived", "error")]
    for outcome in failed:
        intent = next(m.intent for m in mutations if m.name == outcome.name)
        print(f"\n{outcome.name} {outcome.verdict.upper()} ({intent})\n{outcome.detail}")
    killed = sum(o.verdict.startswith(("killed", "timeout")) for o in outcomes)
    print(
        f"\n{killed}/{len(outcomes)} killed, {len(failed)} survived or broken; "
        f"total {time.monotonic() - start:.0f}s with {args.jobs} jobs"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
