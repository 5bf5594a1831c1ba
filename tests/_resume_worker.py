"""Trains the tutorial's Net in a subprocess for the exact-resume tests.

    python tests/_resume_worker.py MODE WORKDIR SCENARIO...

MODE ``full`` trains 2N steps straight through; ``first`` trains N steps, saves a checkpoint
and exits; ``second`` restores that checkpoint in a fresh process and trains N more. Each writes
its final model and optimizer state with ``torch.save`` to ``WORKDIR/<scenario>-<mode>.pt``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

import torchkeep as tk
from torchkeep.models import Net

BATCH = 8
SAMPLES = 64  # 8 batches per epoch
HALF = {"epoch": 16, "mid": 12, "adam": 16}  # N: epoch boundary, mid-epoch, epoch boundary


class ResumableSampler(Sampler[int]):
    """A shuffling sampler that remembers where it is inside the epoch."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch, self.position = size, seed, 0, 0

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        while self.position < self.size:
            self.position += 1
            yield int(order[self.position - 1])
        self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def _setup(scenario: str) -> dict[str, Any]:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    dataset = TensorDataset(
        torch.randn(SAMPLES, 3, 32, 32, generator=data),
        torch.randint(0, 10, (SAMPLES,), generator=data),
    )
    model = Net(dropout=0.3)
    sampler = ResumableSampler(SAMPLES) if scenario == "mid" else None
    # Creating a DataLoader iterator draws a seed from the global RNG unless the loader has its
    # own generator; a mid-epoch resume creates one iterator more than a straight run.
    generator = torch.Generator().manual_seed(2) if sampler is not None else None
    loader = DataLoader(
        dataset, batch_size=BATCH, shuffle=sampler is None, sampler=sampler, generator=generator
    )
    if scenario == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        sched = None
    return {"model": model, "opt": opt, "sched": sched, "loader": loader, "sampler": sampler}


def _train(run: dict[str, Any], steps: int, stop: int) -> int:
    """Train from ``steps`` done until ``stop``; return the steps done."""
    model, opt, sched = run["model"], run["opt"], run["sched"]
    loss_fn = torch.nn.CrossEntropyLoss()
    while steps < stop:
        for x, y in run["loader"]:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            steps += 1
            if steps == stop and run["sampler"] is not None:
                return steps  # mid-epoch: the sampler knows where it is
        if sched is not None:
            sched.step()
    return steps


def main(mode: str, workdir: Path, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    for scenario in scenarios:
        run = _setup(scenario)
        half = HALF[scenario]
        mgr = tk.CheckpointManager(workdir / f"{scenario}-ckpt")
        stateful = {"scheduler": run["sched"], "sampler": run["sampler"]}
        stateful = {k: v for k, v in stateful.items() if v is not None}
        if mode == "full":
            _train(run, 0, 2 * half)
        elif mode == "first":
            steps = _train(run, 0, half)
            mgr.save(steps, model=run["model"], optimizer=run["opt"], **stateful)
        else:
            restored = mgr.restore(model=run["model"], optimizer=run["opt"], **stateful)
            _train(run, restored.step, 2 * half)
        final = {"model": run["model"].state_dict(), "optimizer": run["opt"].state_dict()}
        torch.save(final, workdir / f"{scenario}-{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
