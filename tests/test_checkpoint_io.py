"""The fast paths: direct-I/O streamed writes, background retention, in-place restore."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchkeep as tk
from tests.conftest import assert_state_equal
from torchkeep import tree
from torchkeep.formats import safetensors as st
from torchkeep.hashing import hash_file
from torchkeep.manifest import write_tensors
from torchkeep.models import Net
from torchkeep.storage import stream


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two aligned blocks per staging buffer, so small tensors span many buffers."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 2 * stream.ALIGN)


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "weight": torch.randn(37, 61),
        "transposed": torch.randn(50, 30).t(),  # not contiguous
        "half": torch.randn(1001).half(),
        "index": torch.arange(777, dtype=torch.int64),
        "mask": torch.rand(333) > 0.5,
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }


@pytest.mark.usefixtures("small_chunks")
def test_streamed_file_holds_exactly_the_encoded_bytes_and_its_hash(tmp_path: Path) -> None:
    tensors, metadata = _tensors(), {"format": "pt"}
    record = write_tensors(tmp_path / "direct.safetensors", tensors, metadata)
    expected = b"".join(ctypes.string_at(address, n) for address, n in st.encode(tensors, metadata))
    data = (tmp_path / "direct.safetensors").read_bytes()
    assert data == expected
    assert record.size == len(data)
    assert record.size > 2 * stream.CHUNK_BYTES  # the file spans several staging buffers
    assert record.size % stream.ALIGN  # the padded last block was truncated away
    assert hash_file(tmp_path / "direct.safetensors") == (record.size, record.digest)
    loaded = load_file(tmp_path / "direct.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def _direct_io_supported(directory: Path) -> bool:
    """True when files in ``directory`` accept O_DIRECT (tmpfs and some others do not)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / "direct-io-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


@pytest.fixture
def direct_io(tmp_path: Path) -> None:
    if not _direct_io_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT, so direct I/O cannot be on")


@pytest.mark.usefixtures("small_chunks", "direct_io")
def test_block_writes_use_direct_io_where_the_filesystem_supports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    flags: list[int] = []

    def spy(fd: int, data: memoryview, offset: int) -> int:
        flags.append(fcntl.fcntl(fd, fcntl.F_GETFL))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    record = write_tensors(tmp_path / "w.safetensors", _tensors(), {}, cache="drop")
    assert len(flags) > 2
    assert all(f & os.O_DIRECT for f in flags), "a block was written through the page cache"
    assert hash_file(tmp_path / "w.safetensors") == (record.size, record.digest)


@pytest.mark.usefixtures("small_chunks", "direct_io")
def test_filesystem_refusing_direct_io_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    refused = []

    def no_direct(fd: int, data: memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", no_direct)
    tensors = _tensors()
    record = write_tensors(tmp_path / "w.safetensors", tensors, {}, cache="drop")
    assert hash_file(tmp_path / "w.safetensors") == (record.size, record.digest)
    assert torch.equal(load_file(tmp_path / "w.safetensors")["weight"], tensors["weight"])
    assert len(refused) == 1  # direct I/O was on, then switched to buffered writes once


@pytest.mark.usefixtures("small_chunks")
def test_a_failed_block_write_raises_in_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    calls = []

    def fails_third(fd: int, data: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fails_third)
    with pytest.raises(OSError, match="Input/output"):
        write_tensors(tmp_path / "w.safetensors", _tensors(), {})
    assert len(calls) == 3  # nothing was written after the failure


def test_background_retention_keeps_the_committed_steps(tmp_path: Path) -> None:
    mgr = tk.CheckpointManager(tmp_path, keep_last=2, save_rng=False)
    for step in range(1, 6):
        mgr.save(step, weights=torch.full((1000,), float(step)))
        assert mgr.steps == list(range(max(1, step - 1), step + 1))
    mgr.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]
    assert torch.equal(mgr.restore().extra["weights"], torch.full((1000,), 5.0))


def test_failed_deletion_of_a_retired_step_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = tk.CheckpointManager(tmp_path, keep_last=1, save_rng=False)
    mgr.save(1, weights=torch.ones(10))

    def busy(path: Path) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy", str(path))

    monkeypatch.setattr(shutil, "rmtree", busy)
    mgr.save(2, weights=torch.ones(10))
    with pytest.warns(UserWarning, match="could not be deleted.*step-00000001.*busy"):
        mgr.wait()
    assert mgr.steps == [2]


def _adamw_trained(seed: int) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net(dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
    return model, opt


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return tree.flatten(opt.state_dict(), root="optimizer").tensors


def test_restore_into_live_parameters_and_state_is_bit_exact_and_in_place(
    tmp_path: Path,
) -> None:
    saved_model, saved_opt = _adamw_trained(0)
    mgr = tk.CheckpointManager(tmp_path)
    mgr.save(1, model=saved_model, optimizer=saved_opt)
    model, opt = _adamw_trained(1)  # different values, same shapes: restored in place
    weight, exp_avg = model.conv1.weight, opt.state[model.conv1.weight]["exp_avg"]
    address = weight.data_ptr(), exp_avg.data_ptr()
    mgr.restore(model=model, optimizer=opt)
    assert (model.conv1.weight.data_ptr(), opt.state[weight]["exp_avg"].data_ptr()) == address
    assert_state_equal(saved_model.state_dict(), model.state_dict())
    assert_state_equal(_optimizer_tensors(saved_opt), _optimizer_tensors(opt))
    fresh = Net(dropout=0.1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)  # no state yet: new memory
    mgr.restore(model=fresh, optimizer=fresh_opt)
    assert_state_equal(_optimizer_tensors(saved_opt), _optimizer_tensors(fresh_opt))
    new, live = _optimizer_tensors(fresh_opt).values(), _optimizer_tensors(opt).values()
    pairs = zip(new, live, strict=True)
    assert all(a.data_ptr() != b.data_ptr() for a, b in pairs)  # two restores share no memory
    fresh_opt.step()  # restored state is writable memory of its own
    assert_state_equal(_optimizer_tensors(saved_opt), _optimizer_tensors(opt))


def test_corrupt_optimizer_file_leaves_live_model_and_state_untouched(tmp_path: Path) -> None:
    saved_model, saved_opt = _adamw_trained(0)
    mgr = tk.CheckpointManager(tmp_path)
    mgr.save(1, model=saved_model, optimizer=saved_opt)
    path = tmp_path / "step-00000001" / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    model, opt = _adamw_trained(1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in _optimizer_tensors(opt).items()}
    with pytest.raises(tk.ChecksumMismatchError, match=r"optimizer\.safetensors"):
        mgr.restore(1, model=model, optimizer=opt)
    assert_state_equal(weights, model.state_dict())  # the model file was fine, yet not loaded
    assert_state_equal(state, _optimizer_tensors(opt))
