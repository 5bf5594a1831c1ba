"""The training loops under examples/ resume exactly after a SIGKILL.

Each example runs once straight through, and once killed with SIGKILL in a fresh process (after
the Nth backward pass, or inside the Nth save once its files are written but before its manifest
commits it) and then run again with the same command, which resumes from the newest valid step.
The final steps of both runs must hold bit-identical tensors (weights, optimizer, scheduler and
generator states) and identical plain values. The kill comes from outside the example: this
file runs the script under a small wrapper that installs the hook, so the examples stay plain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchkeep as tk
from tests._compat import require_transformers_with_torch
from tests._source import SRC
from tests.conftest import assert_state_equal

ROOT = Path(__file__).resolve().parent.parent

# Runs `python -c KILL_AND_RUN script.py args...` with TK_KILL="backward:N" or "save:N".
KILL_AND_RUN = """
import os, runpy, signal, sys
import torch
kind, nth = os.environ["TK_KILL"].split(":")
calls = [0]

def tick():
    calls[0] += 1
    if calls[0] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)

if kind == "backward":  # die once the Nth backward pass is done, before its optimizer step
    backward = torch.autograd.backward
    def counted_backward(*args, **kwargs):
        backward(*args, **kwargs)
        tick()
    torch.autograd.backward = counted_backward
else:  # "save": die in the Nth save, its files written and fsynced, its manifest not yet
    from torchkeep.checkpoint import commit
    write_manifest = commit.write_manifest
    def dying_write_manifest(*args, **kwargs):
        tick()
        return write_manifest(*args, **kwargs)
    commit.write_manifest = dying_write_manifest
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Tiny runs: a few seconds of training each. Saves are counted in the order they happen.
ARGS = {
    # 8 steps an epoch; saves at steps 3, 6, 8 (epoch end), 9, 12, 15, 16 (epoch end)
    "mnist": ["--epochs", "2", "--train-size", "256", "--save-interval", "3"],
    # the same steps and saves, written by a background thread
    "imagenet": ["--epochs", "2", "--save-interval", "3", "--async-save"],
    # 8 optimizer steps of 4 micro-batches an epoch; saves at steps 3, 6, 9, 12, 15, 16
    "hf_accumulation": ["--epochs", "2"],
}
SCENARIOS = [
    # example, kill, the steps the second run may resume from
    ("mnist", "backward:11", (9,)),  # mid-epoch 2, after its save at step 9
    ("mnist", "save:3", (6,)),  # inside the epoch-end save of step 8: falls back to step 6
    # an async save of step 12 may still be in flight when the process dies
    ("imagenet", "backward:14", (9, 12)),
    ("imagenet", "save:5", (9,)),  # the background thread dies in the save of step 12
    ("hf_accumulation", "backward:42", (9,)),  # half-way through step 11's accumulation
]


def run_example(name: str, save_dir: Path, kill: str | None = None) -> str:
    """Run examples/<name>.py into ``save_dir``; with ``kill``, check it died of SIGKILL."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(SRC), str(ROOT)]),
        OMP_NUM_THREADS="1",
        TK_KILL=kill or "",
    )
    script = [str(ROOT / "examples" / f"{name}.py"), "--save-dir", str(save_dir), *ARGS[name]]
    wrapper = ["-c", KILL_AND_RUN] if kill else []
    result = subprocess.run(
        [sys.executable, *wrapper, *script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    expected = -signal.SIGKILL if kill else 0
    assert result.returncode == expected, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The checkpoint folder of an uninterrupted run of an example (run once, on first use)."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp(f"{name}-straight")
            run_example(name, runs[name])
        return runs[name]

    return get


def final_step(save_dir: Path) -> tk.Restored:
    """The newest valid step of ``save_dir``, every file's hash verified (nothing restored)."""
    return tk.CheckpointManager(save_dir).restore(restore_rng=False)


def assert_same_step(expected: Path, got: Path) -> None:
    """Two step directories hold bit-identical tensors and identical plain values."""
    names = sorted(p.name for p in expected.glob("*.safetensors"))
    assert names == sorted(p.name for p in got.glob("*.safetensors"))
    assert {"model.safetensors", "optimizer.safetensors"} <= set(names)
    for name in names:
        assert_state_equal(load_file(expected / name), load_file(got / name))
    # epoch, batch, best accuracy, scheduler counters, param groups, Python's RNG state, ...
    assert (expected / "state.json").read_bytes() == (got / "state.json").read_bytes()


@pytest.mark.parametrize(("name", "kill", "resume_steps"), SCENARIOS)
def test_killed_example_resumes_bit_identical(
    straight: Callable[[str], Path],
    tmp_path: Path,
    name: str,
    kill: str,
    resume_steps: tuple[int, ...],
) -> None:
    if name == "hf_accumulation":
        require_transformers_with_torch()
    reference = final_step(straight(name))
    run_example(name, tmp_path, kill=kill)
    resume_step = tk.CheckpointManager(tmp_path).latest_step
    assert resume_step in resume_steps  # the run died before reaching the end
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".step-")]
    if kill.startswith("save"):  # the interrupted save's files are there, uncommitted
        assert len(leftovers) == 1
        assert ".tmp-" in leftovers[0]
    halfway = load_file(tmp_path / f"step-{resume_step:08d}" / "model.safetensors")

    output = run_example(name, tmp_path)  # the same command again, in a fresh process
    assert f"resumed from step {resume_step}" in output
    resumed = final_step(tmp_path)
    assert resumed.step == reference.step
    assert reference.path is not None
    assert resumed.path is not None
    assert_same_step(reference.path, resumed.path)
    assert resumed.metrics == reference.metrics
    final = load_file(resumed.path / "model.safetensors")
    assert any(not torch.equal(halfway[k], final[k]) for k in final)  # the second run trained on
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".step-")]  # cleaned up
