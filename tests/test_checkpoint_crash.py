"""SIGKILL at random moments never costs the last committed step (see scripts/crash_stress.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests._source import SRC

ROOT = Path(__file__).resolve().parent.parent


def test_sigkill_at_random_moments_leaves_committed_steps_intact(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(ROOT)]))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "crash_stress.py"),
            "--kills",
            "24",
            "--dir",
            str(tmp_path),
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: 24 kills" in result.stdout
    steps = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert len(steps) >= 2  # the children made progress between kills
