"""Files written by earlier torchkeep releases still load, bit for bit, with exact resume."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import torchkeep as tk
from tests.conftest import assert_state_equal

GOLDEN = Path(__file__).parent / "golden"


def test_a_torchkeep_0_1_0_step_restores_exactly(tmp_path: Path) -> None:
    """0.1.0 stored the generator states as the entry ``rng``: they are still applied."""
    source = GOLDEN / "torchkeep-0.1.0"
    shutil.copytree(source / "ckpt", tmp_path / "ckpt")
    assert tk.verify(tmp_path / "ckpt").ok
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    restored = tk.CheckpointManager(tmp_path / "ckpt").restore(model=model, optimizer=optimizer)
    assert (restored.step, restored.extra) == (7, {"epoch": 3})
    step = source / "ckpt" / "step-00000007"
    assert_state_equal(model.state_dict(), load_file(step / "model.safetensors"))
    stored_momentum = load_file(step / "optimizer.safetensors")["state[0].momentum_buffer"]
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], stored_momentum)
    expected = json.loads((source / "expected_after_resume.json").read_text())
    assert torch.rand(4).tolist() == expected["torch"]
    assert random.random() == expected["python"]
    assert float(np.random.rand()) == expected["numpy"]
