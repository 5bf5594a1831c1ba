"""The model every golden artifact holds, and how its tensors are recorded.

Its class path (``tests.golden.model.GoldenNet``) is recorded in the golden bundles, so it must
stay here, unchanged, for as long as they exist."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

import torchkeep as tk


class GoldenNet(tk.Keepable, nn.Module):
    """Two linear layers around a batch norm: float weights, float and int64 buffers."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, width)
        self.norm = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


INPUT = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]
"""The input whose outputs each golden set records (batch 2, three features)."""


def tensor_record(tensor: torch.Tensor) -> list[Any]:
    """``[dtype, shape, sha256 of the bytes]`` of a tensor (its exact value, NaN bits included)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
    return [str(tensor.dtype).removeprefix("torch."), list(tensor.shape), digest]


def records(tensors: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
    """:func:`tensor_record` of every tensor, by name."""
    return {name: tensor_record(tensor) for name, tensor in sorted(tensors.items())}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of an optimizer's state, named ``state[<id>].<key>``."""
    state = optimizer.state_dict()["state"]
    return {
        f"state[{pid}].{key}": value
        for pid, values in state.items()
        for key, value in values.items()
        if isinstance(value, torch.Tensor)
    }
