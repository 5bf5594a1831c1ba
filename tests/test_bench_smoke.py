"""The benchmark scripts run end to end (tiny sizes, one run each): a smoke test, never timed.

``make bench`` is a measurement, not a test; this only proves the scripts, the fresh-process
harness and the three-state tables still work, so a refactor cannot break them unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests._source import SRC

ROOT = Path(__file__).resolve().parent.parent


def _run_bench(tmp_path: Path, *args: str) -> tuple[str, dict[str, list[dict[str, object]]]]:
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), *args, "--quick", "--repeat", "1",
         "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_weights_bench_reports_each_state_beside_the_peers(tmp_path: Path) -> None:
    stdout, results = _run_bench(
        tmp_path, "weights", "--case", "large", "--op", "load into model",
        "--state", "right after save", "--state", "warm",
        "--tool", "torchkeep", "--tool", "safetensors",
    )  # fmt: skip
    rows = {(r["operation"], r["state"], r["tool"]) for r in results["bench_weights"]}
    for tool in ("torchkeep", "safetensors"):
        assert ("durable save", "", tool) in rows
        assert ("load into model", "right after save", tool) in rows
        assert ("load into model", "warm", tool) in rows
    assert "vs safetensors" in stdout


def test_checkpoint_bench_reports_restore_beside_torch(tmp_path: Path) -> None:
    stdout, results = _run_bench(tmp_path, "checkpoint", "--state", "right after save")
    rows = {(r["operation"], r["state"], r["tool"]) for r in results["bench_checkpoint"]}
    assert rows == {
        ("durable save", "", "torchkeep"),
        ("durable save", "", "torch"),
        ("restore", "right after save", "torchkeep"),
        ("restore", "right after save", "torch"),
    }
    assert "vs torch" in stdout


def test_cache_floor_bench_measures_each_floor_and_gives_a_verdict(tmp_path: Path) -> None:
    stdout, results = _run_bench(tmp_path, "cache_floor")
    operations = {(r["operation"], r["tool"]) for r in results["bench_cache_floor"]}
    assert operations == {
        ("cached write", "floor"),
        ("cached write + fsync", "floor"),
        ("direct write + fsync", "floor"),
        ("read, not cached (direct)", "floor"),
        ("read, not cached (direct, 4 readers)", "floor"),
        ("read back into the cache (auto)", "torchkeep"),
        ("read, cached", "floor"),
        ("read, cached, into memory (2 threads)", "floor"),
        ("map + touch, cached", "floor"),
        ("durable save", "safetensors"),
        ("load right after its save", "safetensors"),
    }
    assert "best possible save that keeps its file cached" in stdout
    assert "best possible load after a save that does not" in stdout
