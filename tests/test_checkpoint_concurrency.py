"""Concurrent readers and writers of one checkpoint folder.

A training process saves with ``keep_last=1`` (each commit retires the step before it), or
saves one step again and again with ``overwrite=True``, while this process restores in a loop:
every restore must succeed with the exact state of one committed save, with no raw error and
no "unusable step" warning. Two processes saving the same step: exactly one
commits, the other gets StepExistsError. Loops are bounded by iteration counts and processes
by deadlines; nothing asserts on time.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from tests._concurrency_worker import build, expected_state
from tests._source import SRC
from torchkeep.checkpoint import manager
from torchkeep.checkpoint.commit import write_step
from torchkeep.checkpoint.entries import Entry, prepare
from torchkeep.checkpoint.layout import StepInfo
from torchkeep.checkpoint.reader import StepVanishedError

WORKER = Path(__file__).with_name("_concurrency_worker.py")
ROOT = WORKER.parent.parent
DEADLINE_S = 300  # stragglers are killed; no assertion depends on it
STEPS = 60  # saves by the training process; each retires the one before


def _spawn(*args: object) -> subprocess.Popen[str]:
    env = {"PYTHONPATH": f"{SRC}:{ROOT}", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err
    return out


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    for _ in range(DEADLINE_S * 100):
        if path.exists() or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert path.exists(), _finish(proc)


@pytest.mark.parametrize(
    ("mode", "async_save"),
    [("train", False), ("train", True), ("overwrite", False)],
    ids=["keep_last_1", "keep_last_1_async", "overwrite_one_step"],
)
def test_restore_while_another_process_saves(tmp_path: Path, mode: str, async_save: bool) -> None:
    directory = tmp_path / "ckpt"
    writer = _spawn(mode, directory, STEPS, int(async_save))
    try:
        _wait_for(directory / "ready", writer)
        model, opt = build()
        want_model, want_opt = build()
        mgr = tk.CheckpointManager(directory, keep_last=1)
        restored: list[int] = []
        problems: list[str] = []
        for _ in range(20_000):  # bounded; normally ends when the writer is done
            running = writer.poll() is None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    result = mgr.restore(model=model, optimizer=opt, restore_rng=False)
                except Exception as exc:  # every kind counts: none is allowed
                    problems.append(f"{type(exc).__name__}: {exc}")
                    continue
            problems += [str(w.message) for w in caught]
            version = int(result.metrics["version"])
            expected_state(version, want_model, want_opt)
            if not (
                torch.equal(model.weight, want_model.weight)
                and torch.equal(model.bias, want_model.bias)
                and all(
                    torch.equal(
                        opt.state[p]["momentum_buffer"], want_opt.state[q]["momentum_buffer"]
                    )
                    for p, q in zip(model.parameters(), want_model.parameters(), strict=True)
                )
            ):
                problems.append(f"version {version} restored with the state of another one")
            restored.append(version)
            (tmp_path / "reading").touch()  # the writer saves on once a restore succeeded
            if not running:
                break
    finally:
        _finish(writer)
    assert problems == []
    assert restored == sorted(restored)  # never an older state than one already seen
    assert len(set(restored)) > 1  # the reads really overlapped the saves
    assert tk.CheckpointManager(directory).steps == [0 if mode == "overwrite" else STEPS - 1]


def _entries(step: int) -> list[Entry]:
    model, opt = build()
    expected_state(step, model, opt)
    return [prepare("model", model, state_slot=True), prepare("optimizer", opt, state_slot=True)]


def test_the_second_writer_of_a_step_gets_step_exists_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "ckpt"
    model, opt = build()
    expected_state(5, model, opt)
    tk.CheckpointManager(directory).save(5, model=model, optimizer=opt)
    # the loser passed save()'s own check before the winner committed: only the rename tells
    with pytest.raises(tk.StepExistsError, match="another writer"):
        write_step(directory / "step-00000005", 5, _entries(6), overwrite=False, manifest_fields={})
    assert [p.name for p in directory.iterdir()] == ["step-00000005"]
    assert tk.verify(directory / "step-00000005").ok
    fresh, fresh_opt = build()
    tk.CheckpointManager(directory).restore(model=fresh, optimizer=fresh_opt)
    assert torch.equal(fresh.weight, model.weight)


def test_two_processes_saving_the_same_step_one_commits_one_gets_step_exists(
    tmp_path: Path,
) -> None:
    directory, go, rounds = tmp_path / "ckpt", tmp_path / "go", 4
    racers = [_spawn("race", directory, rounds, go) for _ in range(2)]
    try:
        for step in range(rounds):
            for _ in range(DEADLINE_S * 100):  # both ready: then let them go at once
                ready = len(list(tmp_path.glob(f"go-{step}.*.ready")))
                if ready == 2 or any(proc.poll() is not None for proc in racers):
                    break
                time.sleep(0.01)
            Path(f"{go}-{step}").touch()
    finally:
        outputs = [_finish(proc).split() for proc in racers]
    for step, outcomes in enumerate(zip(*outputs, strict=True)):
        assert sorted(outcomes) == ["committed", "exists"], step
        assert tk.verify(directory / f"step-{step:08d}").ok
    assert tk.CheckpointManager(directory).steps == list(range(rounds))
    assert sorted(p.name for p in directory.iterdir()) == [f"step-{s:08d}" for s in range(rounds)]


def test_a_listing_that_missed_every_step_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing taken while a writer commits one step and retires the other can come back
    empty; restore must look again rather than report that no step exists."""
    model, opt = build()
    expected_state(3, model, opt)
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(3, model=model, optimizer=opt)
    real = manager.list_steps
    calls: list[int] = []

    def first_listing_empty(directory: Path) -> list[StepInfo]:
        calls.append(1)
        return [] if len(calls) == 1 else real(directory)

    monkeypatch.setattr(manager, "list_steps", first_listing_empty)
    fresh, fresh_opt = build()
    assert mgr.restore(model=fresh, optimizer=fresh_opt).step == 3
    assert torch.equal(fresh.weight, model.weight)


def test_a_reader_that_always_loses_the_race_gets_checkpoint_busy_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = build()
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, model=model, optimizer=opt)

    def always_retired(path: Path, **_: object) -> None:
        raise StepVanishedError(f"{path} was retired")

    monkeypatch.setattr(manager, "read_step", always_retired)
    fresh, fresh_opt = build()
    expected_state(7, fresh, fresh_opt)
    with pytest.raises(tk.CheckpointBusyError, match="keep_last >= 2"):
        mgr.restore(model=fresh, optimizer=fresh_opt)
    assert torch.equal(fresh.weight, torch.full_like(fresh.weight, 7.0))
