"""save_weights / load_weights / load_state_dict round trips with real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import torchkeep as tk
from tests.conftest import TiedLM, assert_state_equal
from torchkeep.models import Net


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".weights"])
def test_round_trip_is_bit_exact(tmp_path: Path, vgg: torch.nn.Module, suffix: str) -> None:
    path = tk.save_weights(vgg, tmp_path / f"model{suffix}")
    fresh = type(vgg)((16, "M", 32, "M", 64, "M"), 10, 32, hidden=64, batch_norm=True)
    report = tk.load_weights(fresh, path)
    assert report.ok
    assert sorted(report.loaded) == sorted(vgg.state_dict())
    assert_state_equal(vgg.state_dict(), fresh.state_dict())


def test_safetensors_file_is_plain_safetensors(tmp_path: Path, net: Net) -> None:
    path = tk.save_weights(net, tmp_path / "net.safetensors", metadata={"epoch": "3"})
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(net.state_dict())
        assert f.metadata()["epoch"] == "3"
        assert f.metadata()["format"] == "pt"
        assert torch.equal(f.get_tensor("fc1.weight"), net.fc1.weight)


def test_torch_file_loads_with_weights_only(tmp_path: Path, net: Net) -> None:
    path = tk.save_weights(net, tmp_path / "net.pth")
    assert_state_equal(net.state_dict(), torch.load(path, weights_only=True))


def test_tied_weights_written_once_and_restored_tied(tmp_path: Path, tied: TiedLM) -> None:
    path = tk.save_weights(tied, tmp_path / "lm.safetensors")
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        aliases = json.loads(f.metadata()["torchkeep.aliases"])
    assert len(stored) == 3  # embed, norm.weight, norm.bias; head.weight is an alias
    assert aliases == {"head.weight": "embed.weight"}
    state = tk.load_state_dict(path)
    assert state["head.weight"] is state["embed.weight"]
    fresh = TiedLM()
    assert tk.load_weights(fresh, path).ok
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, tied.embed.weight)


ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    raw = torch.randint(
        0, 256, (7 * 5 * 16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    values = raw.view(dtype)  # 560 bytes: a whole number of elements of every dtype
    state = {
        "matrix": values.reshape(7, 5, -1),
        "scalar": values[0].clone().reshape(()),
        "empty": values[:0].reshape(0, 3),
        "odd": values[:3].clone(),
    }
    path = tk.save_weights(state, tmp_path / "t.safetensors")
    assert_state_equal(state, tk.load_state_dict(path))


def test_special_float_values_survive(tmp_path: Path) -> None:
    state = {"x": torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45])}
    assert_state_equal(
        state, tk.load_state_dict(tk.save_weights(state, tmp_path / "f.safetensors"))
    )


def test_non_contiguous_views_are_saved_by_value(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {"t": base.t(), "slice": base[1:3, ::2], "expanded": torch.ones(3, 1).expand(3, 4)}
    for suffix in (".safetensors", ".pt"):
        loaded = tk.load_state_dict(tk.save_weights(state, tmp_path / f"v{suffix}"))
        for key, value in state.items():
            assert torch.equal(loaded[key], value)
    # a .pt of a small slice does not drag the whole storage along
    tk.save_weights({"s": torch.zeros(1_000_000)[:10]}, tmp_path / "small.pt")
    assert (tmp_path / "small.pt").stat().st_size < 10_000


def test_reads_files_written_by_safetensors_and_torch_save(tmp_path: Path, net: Net) -> None:
    save_file(net.state_dict(), str(tmp_path / "peer.safetensors"))
    torch.save(net.state_dict(), tmp_path / "peer.pt")
    torch.save(net.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("peer.safetensors", "peer.pt", "legacy.pt"):
        fresh = Net()
        assert tk.load_weights(fresh, tmp_path / name).ok, name
        assert_state_equal(net.state_dict(), fresh.state_dict())


def test_format_is_recognised_by_content_not_suffix(tmp_path: Path, net: Net) -> None:
    torch.save(net.state_dict(), tmp_path / "really_torch.safetensors")
    save_file(net.state_dict(), str(tmp_path / "really_safetensors.pt"))
    for name in ("really_torch.safetensors", "really_safetensors.pt"):
        assert_state_equal(net.state_dict(), tk.load_state_dict(tmp_path / name))


def test_tutorial_checkpoint_dict_loads_its_model_part(tmp_path: Path, net: Net) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "epoch": 5,
            "model_state_dict": net.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "loss": 0.4,
        },
        path,
    )
    assert_state_equal(net.state_dict(), tk.load_state_dict(path))
    fresh = Net()
    report = tk.load_weights(fresh, path)
    assert report.source_key == "model_state_dict"
    assert any("model_state_dict" in note for note in report.notes)
    assert_state_equal(net.state_dict(), fresh.state_dict())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_fixed_and_reported(tmp_path: Path, net: Net, prefix: str) -> None:
    wrapped = {prefix + k: v for k, v in net.state_dict().items()}
    path = tk.save_weights(wrapped, tmp_path / "wrapped.safetensors")
    fresh = Net()
    report = tk.load_weights(fresh, path)
    assert report.ok
    assert report.renamed == {prefix + k: k for k in net.state_dict()}
    assert "prefix" in report.notes[0]
    assert_state_equal(net.state_dict(), fresh.state_dict())


def test_prefix_is_added_when_the_model_is_wrapped(tmp_path: Path, net: Net) -> None:
    path = tk.save_weights(net, tmp_path / "plain.safetensors")
    wrapped = torch.nn.DataParallel(Net())
    report = tk.load_weights(wrapped, path)
    assert report.ok
    assert_state_equal(net.state_dict(), wrapped.module.state_dict())


def test_strict_mismatch_raises_before_touching_the_model(tmp_path: Path, net: Net) -> None:
    state = net.state_dict()
    state.pop("fc3.bias")
    state["fc1.weight"] = torch.zeros(7, 7)
    state["extra.weight"] = torch.zeros(1)
    path = tk.save_weights(state, tmp_path / "bad.safetensors")
    torch.manual_seed(5)
    target = Net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(tk.StateDictMismatchError) as excinfo:
        tk.load_weights(target, path)
    message = str(excinfo.value)
    for needle in ("fc3.bias", "extra.weight", "fc1.weight", "[7, 7]", "strict=False", str(path)):
        assert needle in message
    assert isinstance(excinfo.value, ValueError)
    assert_state_equal(before, target.state_dict())


def test_non_strict_loads_what_fits_and_reports_the_rest(tmp_path: Path, net: Net) -> None:
    state = net.state_dict()
    state.pop("fc3.bias")
    state["fc1.weight"] = torch.zeros(7, 7)
    path = tk.save_weights(state, tmp_path / "partial.safetensors")
    target = Net()
    report = tk.load_weights(target, path, strict=False)
    assert report.missing == ["fc3.bias"]
    assert report.mismatched == [("fc1.weight", (7, 7), (120, 400))]
    assert torch.equal(target.fc3.weight, net.fc3.weight)
    assert not report.ok


def test_dtype_of_the_model_wins_like_load_state_dict(tmp_path: Path, net: Net) -> None:
    path = tk.save_weights(net, tmp_path / "f32.safetensors")
    half = Net().to(torch.bfloat16)
    tk.load_weights(half, path)
    assert half.fc1.weight.dtype == torch.bfloat16
    assert torch.equal(half.fc1.weight, net.fc1.weight.to(torch.bfloat16))


def test_model_with_custom_loading_hooks_goes_through_its_own_loader(tmp_path: Path) -> None:
    class Versioned(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.calls = 0
            self.register_load_state_dict_post_hook(self._seen)

        def _seen(self, module: torch.nn.Module, keys: object) -> None:
            self.calls += 1

    source = Versioned()
    path = tk.save_weights(source, tmp_path / "v.safetensors")
    target = Versioned()
    tk.load_weights(target, path)
    assert target.calls == 1
    assert torch.equal(target.lin.weight, source.lin.weight)


def test_save_validates_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="'step'"):
        tk.save_weights({"w": torch.ones(2), "step": 3}, path)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="metadata"):
        tk.save_weights({"w": torch.ones(2)}, path, metadata={"epoch": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="reserved"):
        tk.save_weights({"w": torch.ones(2)}, path, metadata={"torchkeep.aliases": "{}"})
    with pytest.raises(tk.TorchkeepFileNotFoundError):
        tk.save_weights({"w": torch.ones(2)}, tmp_path / "no" / "such" / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_keeps_earlier_mapped_tensors_intact(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tk.save_weights({"w": torch.full((1000,), 1.0)}, path)
    mapped = tk.load_state_dict(path)["w"]
    tk.save_weights({"w": torch.full((1000,), 2.0)}, path)
    assert torch.equal(mapped, torch.full((1000,), 1.0))
    assert torch.equal(tk.load_state_dict(path)["w"], torch.full((1000,), 2.0))


def test_exception_mid_write_leaves_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.safetensors"
    tk.save_weights({"w": torch.ones(10)}, path)
    original = path.read_bytes()

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("torchkeep.storage.stream.os.pwrite", explode)
    with pytest.raises(tk.StorageFullError, match=str(path)):
        tk.save_weights({"w": torch.zeros(10)}, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_map_location_accepts_devices_and_strings(tmp_path: Path, net: Net, suffix: str) -> None:
    """A target other than the default ("meta") must take effect, as a string or a device."""
    path = tk.save_weights(net, tmp_path / f"n{suffix}")
    expected = net.state_dict()
    for location in ("meta", torch.device("meta")):
        state = tk.load_state_dict(path, map_location=location)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert tensor.device.type == "meta", name
            assert (tensor.dtype, tensor.shape) == (expected[name].dtype, expected[name].shape)
    assert_state_equal(tk.load_state_dict(path, map_location=torch.device("cpu")), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip(tmp_path: Path, net: Net) -> None:
    path = tk.save_weights(net.cuda(), tmp_path / "n.safetensors")
    state = tk.load_state_dict(path, map_location="cuda:0")
    assert state["fc1.weight"].device.type == "cuda"
    fresh = Net().cuda()
    tk.load_weights(fresh, path)
    assert_state_equal(net.state_dict(), fresh.state_dict())


def test_views_sharing_a_start_are_tied_only_when_identical(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    state = {"whole": base, "head": base[:4], "again": base, "head_again": base[:4]}
    path = tk.save_weights(state, tmp_path / "views.safetensors")
    loaded = tk.load_state_dict(path)
    assert loaded["again"] is loaded["whole"]
    assert loaded["head_again"] is loaded["head"]
    assert loaded["head"] is not loaded["whole"]
    for key, value in state.items():
        assert torch.equal(loaded[key], value)
