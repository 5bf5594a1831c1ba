"""Restoring a checkpoint step that is not in the page cache (checkpoint/reader.py,
formats/safetensors.py ``read_owned``): each tensor is read into memory of its own, hashed
while the next is read, and handed to the restored objects without another copy, once.

Files are made "not cached" with ``fsync`` + ``POSIX_FADV_DONTNEED`` and checked with
``mincore`` (tests/test_cache_policy.py's helpers); the tests skip where the temporary folder
takes no direct I/O (tmpfs keeps everything in memory, so nothing can be uncached). The read
way is pinned through ``coldread.PINNED``; nothing here is timed.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.conftest import assert_state_equal
from tests.test_cache_policy import _evict, _resident_share, direct_dir
from torchkeep import ChecksumMismatchError, CorruptFileError, tree
from torchkeep.checkpoint.reader import read_step, read_tensors
from torchkeep.formats import safetensors as st
from torchkeep.hashing import hash_file
from torchkeep.storage import coldread
from torchkeep.storage.reading import RangeReader

__all__ = ["direct_dir"]  # the fixture, used by name

MODES: list[coldread.ReadMode] = ["direct", "buffered"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> coldread.ReadMode:
    """Every unfixed chooser reads uncached bytes this way."""
    monkeypatch.setattr(coldread, "PINNED", request.param)
    return request.param  # type: ignore[no-any-return]


class Tied(nn.Module):
    """A tied pair, a zero-size buffer and a buffer of another dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.register_buffer("empty", torch.zeros(0, 5))
        self.register_buffer("counts", torch.arange(7, dtype=torch.int64))


class Model(Tied):
    """Large enough that the optimizer's file spans several 16 MiB reads (split tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(1024, 2100)  # 8.2 MiB of weight, twice that again with AdamW

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)).sum() + self.big(y).sum()


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(4, 64), torch.randn(4, 1024)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(9)
    model = Model()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step_files(folder: Path, step: int) -> list[Path]:
    return sorted((folder / f"step-{step:08d}").rglob("*.safetensors"))


def _evict_step(folder: Path, step: int) -> None:
    for path in _step_files(folder, step):
        _evict(path)


def _saved(folder: Path) -> tuple[tk.CheckpointManager, nn.Module, torch.optim.Optimizer]:
    mgr = tk.CheckpointManager(folder, cache="drop", keep_last=5)
    model, optimizer = _trained()
    mgr.save(1, model=model, optimizer=optimizer, epoch=1)
    _evict_step(folder, 1)
    return mgr, model, optimizer


def _optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if t.dim()]


def test_an_uncached_restore_is_bit_exact_and_its_optimizer_state_owns_its_memory(
    direct_dir: Path, mode: coldread.ReadMode
) -> None:
    mgr, model, optimizer = _saved(direct_dir)
    fresh, fresh_optimizer = _fresh()
    mgr.restore(model=fresh, optimizer=fresh_optimizer)
    _assert_restored_exactly_into_memory_of_its_own(fresh, fresh_optimizer, model, optimizer)
    assert fresh.b.weight is fresh.a.weight  # still tied in the live model


def _assert_restored_exactly_into_memory_of_its_own(
    fresh: nn.Module,
    fresh_optimizer: torch.optim.Optimizer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """A fresh model and optimizer hold exactly the saved state, and every optimizer state
    tensor owns its storage: no view into a larger buffer or a mapping (torch.save of it
    would write all of that), no two sharing one."""
    assert_state_equal(fresh.state_dict(), model.state_dict())
    saved = tree.flatten(optimizer.state_dict()).tensors
    assert_state_equal(tree.flatten(fresh_optimizer.state_dict()).tensors, saved)
    state = _optimizer_state_tensors(fresh_optimizer)
    assert len(state) == 2 * len(list(fresh.parameters()))
    for tensor in state:
        assert tensor.untyped_storage().nbytes() == tensor.nbytes
    assert len({t.untyped_storage().data_ptr() for t in state}) == len(state)


def test_an_uncached_restore_into_live_state_fills_it_in_place(
    direct_dir: Path, mode: coldread.ReadMode
) -> None:
    _assert_restores_in_place(*_saved(direct_dir))


def _assert_restores_in_place(
    mgr: tk.CheckpointManager, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Restoring into a live model and a stepped optimizer fills their own memory in place,
    with exactly the saved state."""
    live, live_optimizer = _trained(seed=4)  # stepped: its state tensors are the targets
    memory = sorted(t.data_ptr() for t in _optimizer_state_tensors(live_optimizer))
    parameters = [p.data_ptr() for p in live.parameters()]
    mgr.restore(model=live, optimizer=live_optimizer)
    assert [p.data_ptr() for p in live.parameters()] == parameters
    assert sorted(t.data_ptr() for t in _optimizer_state_tensors(live_optimizer)) == memory
    assert_state_equal(live.state_dict(), model.state_dict())
    saved = tree.flatten(optimizer.state_dict()).tensors
    assert_state_equal(tree.flatten(live_optimizer.state_dict()).tensors, saved)


def test_uncached_tensors_are_handed_over_without_a_copy_and_only_once(
    direct_dir: Path, mode: coldread.ReadMode
) -> None:
    _saved(direct_dir)
    loaded = read_step(direct_dir / "step-00000001")
    stored = loaded.tensors["optimizer"]
    first = tree.flatten(loaded.value("optimizer")).tensors
    second = tree.flatten(loaded.value("optimizer")).tensors
    assert sorted(first) == sorted(second)
    handed = {t.data_ptr() for t in stored.values() if t.numel()}
    assert {t.data_ptr() for t in first.values() if t.numel()} == handed  # no copy the first time
    for name, tensor in first.items():
        if tensor.numel():
            assert tensor.data_ptr() != second[name].data_ptr(), name  # never shared
            assert tensor.untyped_storage().nbytes() == tensor.nbytes, name
        assert torch.equal(tensor, second[name]), name


def test_tied_names_come_back_as_one_tensor_owned_once(direct_dir: Path) -> None:
    mgr = tk.CheckpointManager(direct_dir, cache="drop")
    model = Tied()
    mgr.save(1, model=model)
    _evict_step(direct_dir, 1)
    loaded = read_step(direct_dir / "step-00000001")
    first = loaded.value("model")
    assert first["a.weight"] is first["b.weight"]
    assert first["a.weight"].untyped_storage().nbytes() == first["a.weight"].nbytes
    second = loaded.value("model")
    assert second["a.weight"] is second["b.weight"]
    assert second["a.weight"].data_ptr() != first["a.weight"].data_ptr()
    assert_state_equal(second, model.state_dict())


def test_a_corrupt_uncached_step_changes_nothing_and_restore_falls_back(
    direct_dir: Path, mode: coldread.ReadMode
) -> None:
    mgr, model, optimizer = _saved(direct_dir)
    later_model, later_optimizer = _trained(seed=5)
    mgr.save(2, model=later_model, optimizer=later_optimizer, epoch=2)
    files = _step_files(direct_dir, 2)
    victim = max(files, key=lambda p: p.stat().st_size)  # the optimizer's: several reads
    with open(victim, "r+b") as f:  # flip a byte of the last tensor, far from the first read
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))
    _evict_step(direct_dir, 2)
    assert _resident_share(victim) < 0.1
    live, live_optimizer = _fresh()
    before_model = copy.deepcopy(live.state_dict())
    with pytest.raises(ChecksumMismatchError, match="optimizer"):
        mgr.restore(step=2, model=live, optimizer=live_optimizer)
    assert_state_equal(live.state_dict(), before_model)
    assert live_optimizer.state_dict()["state"] == {}
    with pytest.warns(UserWarning, match="step 2 is unusable"):
        restored = mgr.restore(model=live, optimizer=live_optimizer)
    assert restored.step == 1
    assert_state_equal(live.state_dict(), model.state_dict())
    saved = tree.flatten(optimizer.state_dict()).tensors
    got = tree.flatten(live_optimizer.state_dict()).tensors
    assert_state_equal(got, saved)


# ---- a cached step: mapped only where it is copied into place -----------------------------


class _ReadWays:
    """Records, per tensor file name, whether a cached read mapped it or read it into memory
    of its own (``st.load_tensors`` maps; ``st.read_owned`` reads)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mapped: list[str] = []
        self.owned: list[str] = []
        load_tensors, read_owned = st.load_tensors, st.read_owned

        def mapping(header: st.Header) -> dict[str, torch.Tensor]:
            self.mapped.append(header.path.name)
            return load_tensors(header)

        def owning(header: st.Header, reader: RangeReader):  # type: ignore[no-untyped-def]
            self.owned.append(header.path.name)
            return read_owned(header, reader)

        monkeypatch.setattr(st, "load_tensors", mapping)
        monkeypatch.setattr(st, "read_owned", owning)


def _cached(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[tk.CheckpointManager, nn.Module, torch.optim.Optimizer, _ReadWays]:
    """A step saved with ``cache="keep"`` and read once (every page of it in the page cache),
    and a recorder of the ways its files are read from then on."""
    mgr = tk.CheckpointManager(folder, cache="keep", keep_last=5)
    model, optimizer = _trained()
    mgr.save(1, model=model, optimizer=optimizer, epoch=1)
    for path in _step_files(folder, 1):
        path.read_bytes()
        assert _resident_share(path) == 1.0, path
    return mgr, model, optimizer, _ReadWays(monkeypatch)


def test_a_cached_step_restored_into_a_fresh_optimizer_reads_its_state_instead_of_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr, model, optimizer, ways = _cached(tmp_path, monkeypatch)
    fresh, fresh_optimizer = _fresh()
    parameters = [p.data_ptr() for p in fresh.parameters()]
    mgr.restore(model=fresh, optimizer=fresh_optimizer)
    assert "model.safetensors" in ways.mapped  # copied into the parameters from the mapping
    assert "optimizer.safetensors" in ways.owned  # no state to fill: read where it will stay
    assert "optimizer.safetensors" not in ways.mapped
    assert [p.data_ptr() for p in fresh.parameters()] == parameters
    _assert_restored_exactly_into_memory_of_its_own(fresh, fresh_optimizer, model, optimizer)


def test_a_cached_step_restored_into_live_state_is_mapped_and_copied_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr, model, optimizer, ways = _cached(tmp_path, monkeypatch)
    _assert_restores_in_place(mgr, model, optimizer)
    assert {"model.safetensors", "optimizer.safetensors"} <= set(ways.mapped)


def test_a_wrapped_model_is_placed_by_shape_so_its_cached_file_is_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr, model, _, ways = _cached(tmp_path, monkeypatch)
    fresh, _ = _fresh()
    wrapped = nn.DataParallel(fresh)  # its keys carry "module.": names do not match the step's
    mgr.restore(model=wrapped)
    assert "model.safetensors" in ways.mapped
    assert_state_equal(fresh.state_dict(), model.state_dict())


def test_a_cached_file_is_mapped_only_when_most_of_its_bytes_have_a_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, model, _, ways = _cached(tmp_path, monkeypatch)
    step = tmp_path / "step-00000001"
    big = model.state_dict()["big.weight"]  # most of the model file's bytes
    read_step(step, into={"model": {"anything": torch.empty_like(big)}})
    assert ways.mapped == ["model.safetensors"]
    ways.mapped.clear()
    small = {"a": torch.empty(64, 64), "bias": torch.empty(2100), "grad": big.clone()}
    small["grad"].requires_grad_()  # cannot be filled in place
    read_step(step, into={"model": small})
    assert ways.mapped == []
    assert "model.safetensors" in ways.owned


def test_read_step_without_targets_hands_cached_tensors_over_without_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, model, optimizer, ways = _cached(tmp_path, monkeypatch)
    loaded = read_step(tmp_path / "step-00000001")
    assert ways.mapped == []
    stored = loaded.tensors["optimizer"]
    got = tree.flatten(loaded.value("optimizer")).tensors
    handed = {t.data_ptr() for t in stored.values() if t.numel()}
    assert {t.data_ptr() for t in got.values() if t.numel()} == handed
    assert_state_equal(got, tree.flatten(optimizer.state_dict()).tensors)
    assert_state_equal(loaded.value("model"), model.state_dict())


# ---- the reader of one file ----------------------------------------------------------------


def _handmade(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file laid out as another writer might: no alignment padding at all."""
    header: dict[str, object] = {}
    data = b""
    for name, tensor in tensors.items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": st.NAME_OF_DTYPE[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
        f.flush()
        os.fsync(f.fileno())


def test_misaligned_and_empty_tensors_of_another_writer_read_exactly_when_uncached(
    direct_dir: Path, mode: coldread.ReadMode
) -> None:
    torch.manual_seed(1)
    tensors = {
        "odd": torch.arange(3, dtype=torch.uint8),  # everything after it is misaligned
        "f": torch.randn(1 << 20),
        "none": torch.zeros(0, 4, dtype=torch.float64),
        "d": torch.randn(333, dtype=torch.float64),
        "last_empty": torch.zeros(0, dtype=torch.int32),
    }
    path = direct_dir / "other.safetensors"
    _handmade(path, tensors)
    _evict(path)
    got = read_tensors(path, hash_file(path)[1])
    assert_state_equal(got, tensors)
    for tensor in got.values():
        assert tensor.untyped_storage().nbytes() == tensor.nbytes  # its own memory
    _evict(path)
    with pytest.raises(ChecksumMismatchError):
        read_tensors(path, "0" * 32)


def test_a_file_truncated_while_it_is_read_is_corrupt(
    direct_dir: Path, mode: coldread.ReadMode
) -> None:
    path = direct_dir / "t.safetensors"
    _handmade(path, {"a": torch.randn(3 << 20), "b": torch.randn(1000)})
    header = st.read_header(path)
    os.truncate(path, header.file_size - 100)  # after the header was checked
    _evict(path)
    with RangeReader(path) as reader, pytest.raises(CorruptFileError, match="ended early"):
        for _ in st.read_owned(header, reader):
            pass
