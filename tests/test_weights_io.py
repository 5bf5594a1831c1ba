"""The fast paths of the safetensors reader and writer: chunked and threaded reads, partial
system-call results, many small tensors, misaligned files, and the paused garbage collector."""

from __future__ import annotations

import gc
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchkeep as tk
from tests.conftest import assert_state_equal
from torchkeep.formats import safetensors as st
from torchkeep.storage import stream


def _random_state(count: int, numel: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(count * numel)
    return {f"w{i}": torch.randn(numel, generator=generator) for i in range(count)}


def _through_a_model(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    model = torch.nn.Module()
    for name, value in state.items():
        model.register_parameter(name, torch.nn.Parameter(torch.zeros_like(value)))
    tk.load_weights(model, tk.save_weights(state, path))
    return {name: value.detach() for name, value in model.state_dict().items()}


def test_tensors_bigger_than_a_read_chunk_load_bit_exactly_on_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(st, "_READ_CHUNK", 4096)  # 10,001 floats: ten chunks, odd tail
    state = _random_state(3, 10_001)
    assert_state_equal(state, _through_a_model(state, tmp_path / "big.safetensors"))


def test_many_small_tensors_fill_reads_of_many_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(st, "_IOV_MAX", 7)
    state = _random_state(50, 33)
    assert_state_equal(state, _through_a_model(state, tmp_path / "small.safetensors"))


def test_partial_preadv_results_are_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_preadv = os.preadv

    def stingy_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        first = buffers[0][: max(1, len(buffers[0]) // 2 - 3)]  # part of the first buffer only
        return real_preadv(fd, [first], offset)

    monkeypatch.setattr(st.os, "preadv", stingy_preadv)
    state = _random_state(4, 1000)
    assert_state_equal(state, _through_a_model(state, tmp_path / "p.safetensors"))


def test_partial_writes_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite

    def stingy_pwrite(fd: int, data: memoryview, offset: int) -> int:
        stream._drop_direct_io(fd)  # a short direct write would leave the offset misaligned
        return real_pwrite(fd, memoryview(data)[:777], offset)

    monkeypatch.setattr(stream.os, "pwrite", stingy_pwrite)
    state = _random_state(5, 1000)
    path = tk.save_weights(state, tmp_path / "w.safetensors")
    assert_state_equal(state, load_file(path))


def test_file_shrinking_during_a_threaded_read_is_a_corrupt_file_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(st, "_READ_CHUNK", 4096)
    state = _random_state(2, 10_000)
    path = tk.save_weights(state, tmp_path / "t.safetensors")
    header = st.read_header(path)
    os.truncate(path, header.file_size // 2)
    with pytest.raises(tk.CorruptFileError, match="ended early"):
        st.read_into(header, {name: torch.empty_like(value) for name, value in state.items()})


def test_misaligned_tensors_from_other_writers_load_correctly(tmp_path: Path) -> None:
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    header = {
        "flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "values": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
    }
    body = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\x07" + values.numpy().tobytes())
    lazy = tk.load_state_dict(path)
    assert torch.equal(lazy["values"], values)
    assert lazy["flag"].tolist() == [7]
    target = torch.zeros(3)
    st.read_into(st.read_header(path), {"values": target})
    assert torch.equal(target, values)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_restored_even_after_an_error(
    tmp_path: Path, enabled: bool
) -> None:
    path = tk.save_weights({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        tk.load_state_dict(path)
        with pytest.raises(tk.TorchkeepError):
            tk.load_state_dict(tmp_path / "missing.safetensors")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
