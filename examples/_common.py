"""What the three examples share: exact-resume seeding and a data order that can restart.

A run resumes bit for bit when everything random is either restored from the checkpoint or a
pure function of numbers the checkpoint holds:

- the global generators (Python, NumPy, torch: dropout, random init) are saved with every step
  and put back by ``CheckpointManager.restore``;
- the order of the samples in an epoch is drawn from a generator seeded by ``(seed, epoch)``,
  so a run resumed in the middle of epoch 3 draws the same order again and skips the batches
  it has done; the ``DataLoader`` gets that generator too, so creating its iterator does not
  draw from the global generator (which the uninterrupted run would not have done).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def make_deterministic(seed: int) -> None:
    """Seed every global generator and make torch pick deterministic kernels.

    Bit-identical results also need the same thread count in both runs
    (``OMP_NUM_THREADS``), the same device and the same library versions.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def epoch_loader(
    dataset: Dataset[tuple[torch.Tensor, ...]],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    num_workers: int = 0,
) -> DataLoader[tuple[torch.Tensor, ...]]:
    """The batches of ``epoch`` in an order fixed by ``(seed, epoch)``, from ``start_batch`` on.

    The skipped batches are never loaded. With ``num_workers > 0`` the workers are seeded
    from the same generator, so they too start alike; random augmentation inside workers is
    exact on a mid-epoch resume only if it is seeded per sample.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(dataset), generator=generator)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order[start_batch * batch_size :].tolist(),
        generator=generator,
        num_workers=num_workers,
    )
