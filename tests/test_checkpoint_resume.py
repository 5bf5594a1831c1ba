"""Exact resume: a run interrupted and restored in fresh processes ends bit-identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._source import SRC
from tests.conftest import assert_state_equal

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["epoch", "mid", "adam"]


def run_worker(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(ROOT)]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_resume_worker.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("resume")
    run_worker("full", str(workdir), *SCENARIOS)  # 2N steps in one process
    run_worker("first", str(workdir), *SCENARIOS)  # N steps, save, exit
    run_worker("second", str(workdir), *SCENARIOS)  # a fresh process: restore, N more
    return workdir


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_resumed_run_is_bit_identical(runs: Path, scenario: str) -> None:
    full = torch.load(runs / f"{scenario}-full.pt", weights_only=True)
    resumed = torch.load(runs / f"{scenario}-second.pt", weights_only=True)
    halfway = torch.load(runs / f"{scenario}-first.pt", weights_only=True)
    assert_state_equal(full["model"], resumed["model"])
    assert full["optimizer"]["param_groups"] == resumed["optimizer"]["param_groups"]
    for key, state in full["optimizer"]["state"].items():
        assert_state_equal(state, resumed["optimizer"]["state"][key])
    assert not torch.equal(full["model"]["fc3.weight"], halfway["model"]["fc3.weight"])
    if scenario == "adam":  # the scheduler resumed too: lr halved after each of 4 epochs
        assert resumed["optimizer"]["param_groups"][0]["lr"] == 0.001 / 16
