"""Kill a checkpointing process with SIGKILL at random moments; check what survives.

    python scripts/crash_stress.py [--kills 500] [--dir DIR] [--seed 0]

A forked child saves steps in a loop (retention deleting old ones as it goes) until it is
killed at a random moment: while writing, hashing, fsyncing, renaming or deleting (the window
for the kill widens whenever a kill found no new step, so a slow machine still commits steps).
After each kill a second forked child checks that ``restore()`` returns a committed step whose
contents equal what was saved at that step, and that every committed step verifies. The parent
imports torch but runs no torch op, so forking stays safe. Exit code 0 when every check passed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import torchkeep as tk


def payload(step: int) -> dict[str, object]:
    """What is saved at ``step``: about 1 MiB of tensors and a few values, all step-dependent."""
    return {
        "weights": torch.full((256 * 1024,), float(step)),
        "optimizer_like": {"state": {0: {"m": torch.arange(1000) * step}}, "lr": 1.0 / (step + 1)},
        "epoch": step,
    }


def _manager(directory: Path) -> tk.CheckpointManager:
    return tk.CheckpointManager(directory, keep_last=2, keep_every=7)


def _save_forever(directory: Path) -> None:
    torch.set_num_threads(1)
    mgr = _manager(directory)
    step = (mgr.latest_step or 0) + 1
    while True:
        mgr.save(step, **payload(step))
        step += 1


def _check(directory: Path) -> str | None:
    """None when the folder is consistent, else what is wrong."""
    torch.set_num_threads(1)
    mgr = _manager(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a committed step must never be found corrupt
        try:
            restored = mgr.restore()
        except tk.CheckpointNotFoundError:
            return None if not mgr.steps else "committed steps exist but none restored"
    expected = payload(restored.step)
    got = restored.extra
    if got["epoch"] != restored.step or not torch.equal(got["weights"], expected["weights"]):
        return f"step {restored.step} holds the contents of another step"
    if got["optimizer_like"]["lr"] != expected["optimizer_like"]["lr"]:  # type: ignore[index]
        return f"step {restored.step}: wrong nested values"
    report = tk.verify(directory)
    return None if report.ok else "; ".join(report.problems)


def _in_child(job: object, directory: Path) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if job is _check:
                problem = _check(directory)
                if problem:
                    sys.stderr.write(f"check failed: {problem}\n")
                    code = 1
            else:
                _save_forever(directory)
        except BaseException as exc:
            sys.stderr.write(f"child failed: {exc!r}\n")
            code = 1
        os._exit(code)
    return pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=500)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.15, help="seconds before a kill")
    args = parser.parse_args(argv)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="torchkeep-crash-"))
    rand = random.Random(args.seed)
    max_delay, latest = args.max_delay, 0
    for kill in range(args.kills):
        saver = _in_child(_save_forever, directory)
        time.sleep(rand.uniform(0.0, max_delay))
        os.kill(saver, signal.SIGKILL)
        os.waitpid(saver, 0)
        _, status = os.waitpid(_in_child(_check, directory), 0)
        if os.waitstatus_to_exitcode(status) != 0:
            print(f"FAILED after kill {kill + 1}; folder kept at {directory}")
            return 1
        # On a loaded machine a save may take longer than the longest delay: widen the window
        # until saves commit again, so kills keep landing in every phase of a save.
        now = _manager(directory).latest_step or 0
        if now == latest:
            max_delay = min(max_delay * 1.5, 5.0)
        latest = now
    steps = _manager(directory).steps
    print(f"ok: {args.kills} kills, every restore exact; steps on disk {steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
