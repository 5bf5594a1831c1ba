"""Writers for the concurrency tests, run as separate processes.

    python tests/_concurrency_worker.py train DIRECTORY STEPS ASYNC
    python tests/_concurrency_worker.py overwrite DIRECTORY STEPS ASYNC
    python tests/_concurrency_worker.py race DIRECTORY STEPS GO

``train`` saves steps 0..STEPS-1 with ``keep_last=1`` (ASYNC ``1``: ``async_save=True``); the
state of step ``s`` is :func:`expected_state` of ``s``, so a reader can check any restore bit for
bit (the manifest's metric ``version`` says which state a step holds). ``overwrite`` saves
the same states all as step 0 with ``overwrite=True``. Both create ``DIRECTORY/ready`` once
the first save is committed, then wait for ``DIRECTORY/../reading`` before saving on.
``race`` saves steps 0..STEPS-1, each when the test creates ``GO-<step>``, and prints
``committed`` or ``exists`` for each.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

import torchkeep as tk

WIDTH = 256  # 256 KiB of weights per step: reads take long enough to overlap retention


def build() -> tuple[nn.Linear, torch.optim.SGD]:
    """The model and optimizer both sides use (momentum buffers exist from the start)."""
    model = nn.Linear(WIDTH, WIDTH)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    opt.step()
    return model, opt


def expected_state(step: int, model: nn.Linear, opt: torch.optim.SGD) -> None:
    """Put the state of ``step`` into ``model`` and ``opt`` (a function of the step only)."""
    with torch.no_grad():
        model.weight.fill_(float(step))
        model.bias.fill_(-float(step))
        for param in model.parameters():
            opt.state[param]["momentum_buffer"].fill_(step + 0.5)


def train(directory: Path, steps: int, async_save: bool, *, overwrite: bool = False) -> None:
    """Save ``steps`` versions: as steps 0, 1, ... or, with ``overwrite``, all as step 0."""
    model, opt = build()
    with tk.CheckpointManager(directory, keep_last=1, async_save=async_save) as mgr:
        for version in range(steps):
            expected_state(version, model, opt)
            step = 0 if overwrite else version
            mgr.save(
                step, model=model, optimizer=opt, metrics={"version": version}, overwrite=overwrite
            )
            if version == 0:
                mgr.wait()
                (directory / "ready").touch()
                for _ in range(100_000):  # bounded wait until the reader has restored once
                    if (directory.parent / "reading").exists():
                        break
                    time.sleep(0.001)


def race(directory: Path, steps: int, go: Path) -> None:
    """For each step: announce ``<go>-<step>.<pid>.ready``, wait for ``<go>-<step>``, save."""
    model, opt = build()
    mgr = tk.CheckpointManager(directory, keep_last=None)
    for step in range(steps):
        expected_state(step, model, opt)
        Path(f"{go}-{step}.{os.getpid()}.ready").touch()
        for _ in range(100_000):  # bounded wait for the starting signal
            if Path(f"{go}-{step}").exists():
                break
            time.sleep(0.001)
        try:
            mgr.save(step, model=model, optimizer=opt)
        except tk.StepExistsError:
            print("exists", flush=True)
        else:
            print("committed", flush=True)


if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    if mode in ("train", "overwrite"):
        train(where, int(sys.argv[3]), sys.argv[4] == "1", overwrite=mode == "overwrite")
    else:
        race(where, int(sys.argv[3]), Path(sys.argv[4]))
