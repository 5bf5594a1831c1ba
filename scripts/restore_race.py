"""Restore in a loop while another process saves with ``keep_last=1``; count what goes wrong.

    python scripts/restore_race.py [--saves 300] [--async-save] [--overwrite] [--dir DIR]

A forked child saves ``--saves`` states (step ``s`` holds weights equal to ``s``), each commit
retiring the step before it (or, with ``--overwrite``, replacing step 0 each time). The parent
restores the latest step as fast as it can until the child is done and prints how many
restores succeeded with an exact state, and every failure by exception type. Exit code 0 when
no restore failed and none returned a wrong state.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

import torchkeep as tk

WIDTH = 256


def _state(version: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((WIDTH, WIDTH), float(version)), "bias": torch.zeros(WIDTH)}


def _writer(directory: Path, saves: int, async_save: bool, overwrite: bool) -> None:
    with tk.CheckpointManager(directory, keep_last=1, async_save=async_save) as mgr:
        for version in range(saves):
            step = 0 if overwrite else version
            mgr.save(step, model=_state(version), metrics={"v": version}, overwrite=overwrite)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=300)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    directory = (args.dir or Path(tempfile.mkdtemp())) / "ckpt"
    child = os.fork()  # before the parent runs any torch op, so forking is safe
    if child == 0:
        _writer(directory, args.saves, args.async_save, args.overwrite)
        os._exit(0)
    while not (directory / "step-00000000").exists():  # the first commit
        if os.waitpid(child, os.WNOHANG)[0] != 0:
            return 2
        time.sleep(0.01)
    model = torch.nn.Linear(WIDTH, WIDTH)
    mgr = tk.CheckpointManager(directory, keep_last=1)
    outcomes: Counter[str] = Counter()
    while True:
        done = os.waitpid(child, os.WNOHANG)[0] != 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                restored = mgr.restore(model=model, restore_rng=False)
            except Exception as exc:
                outcomes[type(exc).__name__] += 1
            else:
                exact = torch.equal(model.weight, _state(int(restored.metrics["v"]))["weight"])
                outcomes["ok" if exact else "wrong state"] += 1
        outcomes.update(f"warning: {str(w.message)[:40]}" for w in caught)
        if done:
            break
    total = sum(n for k, n in outcomes.items() if not k.startswith("warning"))
    for kind, count in outcomes.most_common():
        print(f"{kind:>48}: {count:6d} ({100 * count / total:.1f}% of {total} restores)")
    return 0 if set(outcomes) == {"ok"} else 1


if __name__ == "__main__":
    sys.exit(main())
