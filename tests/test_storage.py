"""Atomic files and staged directories: what a reader can observe around failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import torchkeep as tk
from torchkeep.storage import local


def test_atomic_file_appears_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    with local.atomic_file(target) as f:
        f.write(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"


def test_atomic_file_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), local.atomic_file(target) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_staged_directory_commits_whole(tmp_path: Path) -> None:
    final = tmp_path / "step-1"
    with local.staged_directory(final) as staging:
        (staging / "a").write_text("1")
        assert not final.exists()
    assert (final / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]


@pytest.mark.parametrize("can_exchange", [True, False])
def test_staged_directory_overwrite_replaces_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, can_exchange: bool
) -> None:
    if not can_exchange:
        monkeypatch.setattr(local, "_exchange", lambda a, b: False)
    final = tmp_path / "step-1"
    with local.staged_directory(final) as staging:
        (staging / "old").write_text("old")
    with local.staged_directory(final, overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]


def test_staged_directory_without_overwrite_refuses_existing(tmp_path: Path) -> None:
    final = tmp_path / "step-1"
    final.mkdir()
    (final / "keep").write_text("keep")
    with pytest.raises(OSError, match="step-1"), local.staged_directory(final) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["keep"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]


def test_disk_full_becomes_storage_full_error(tmp_path: Path) -> None:
    final = tmp_path / "step-1"
    with pytest.raises(tk.StorageFullError, match="step-1"), local.staged_directory(final):
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".step-2{local.TEMP_MARKER}{dead_pid}-abcd"
    stale.mkdir()
    live = local.temp_sibling(tmp_path / "step-3")
    live.mkdir()
    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine")
    assert local.remove_stale_temps(tmp_path) == [stale]
    assert live.exists()
    assert foreign.exists()
