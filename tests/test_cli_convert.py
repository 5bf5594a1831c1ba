"""``torchkeep convert``: torch.save <-> safetensors, bit for bit, ties kept, no overwrites."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import torchkeep as tk
from tests.conftest import TiedLM, assert_state_equal
from torchkeep.cli import main
from torchkeep.convert import convert
from torchkeep.models import Net


def _every_dtype_state() -> dict[str, torch.Tensor]:
    """Values chosen to catch any rounding: NaN payloads, -0.0, extremes of every dtype."""
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (64,), dtype=torch.uint8)
    state = {
        "f32": torch.tensor([float("nan"), -0.0, float("inf"), 1e-45, 3.4e38]),
        "f64": torch.randn(3, 4, dtype=torch.float64),
        "bf16": raw.clone().view(torch.bfloat16),
        "f16": raw.clone().view(torch.float16).reshape(4, 8),
        "f8": raw.clone().view(torch.float8_e4m3fn),
        "f8_e5m2": raw.clone().view(torch.float8_e5m2),
        "i64": torch.tensor([-(2**63), 2**63 - 1]),
        "u8": raw,
        "bool": raw > 100,
        "c64": torch.randn(3, dtype=torch.complex64),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
    }
    state["transposed"] = torch.randn(3, 5).t()  # non-contiguous: stored by value
    return state


def _bytes_of(path: Path) -> dict[str, bytes]:
    state = tk.load_state_dict(path)
    return {
        k: v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in state.items()
    }


def test_both_ways_is_bit_exact_for_every_dtype(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = _every_dtype_state()
    pt = tmp_path / "orig.pt"
    torch.save(original, pt)
    assert main(["convert", str(pt), str(tmp_path / "a.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.pth")]) == 0
    assert main(["convert", str(tmp_path / "b.pth"), str(tmp_path / "c.safetensors")]) == 0
    assert "converted" in capsys.readouterr().out
    expected = _bytes_of(pt)
    for name in ["a.safetensors", "b.pth", "c.safetensors"]:
        assert _bytes_of(tmp_path / name) == expected, name
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert_state_equal({k: f.get_tensor(k) for k in f.keys()}, original)  # noqa: SIM118
    assert_state_equal(torch.load(tmp_path / "b.pth", weights_only=True), original)


def test_tutorial_checkpoint_converts_its_model_part(
    tmp_path: Path, net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 5, "model_state_dict": net.state_dict(), "loss": 0.4}, path)
    assert main(["convert", str(path), str(tmp_path / "net.safetensors")]) == 0
    assert "'model_state_dict' entry" in capsys.readouterr().out
    fresh = Net()
    assert tk.load_weights(fresh, tmp_path / "net.safetensors").ok
    assert_state_equal(fresh.state_dict(), net.state_dict())


def test_tied_weights_stay_tied_both_ways(tmp_path: Path, tied: TiedLM) -> None:
    source = tk.save_weights(tied, tmp_path / "lm.safetensors")
    done = convert(source, tmp_path / "lm.pt")
    assert done.tied == {"head.weight": "embed.weight"}
    from_pt = torch.load(tmp_path / "lm.pt", weights_only=True)
    assert from_pt["head.weight"].untyped_storage().data_ptr() == (
        from_pt["embed.weight"].untyped_storage().data_ptr()
    )
    back = convert(tmp_path / "lm.pt", tmp_path / "back.safetensors")
    assert back.tied == {"head.weight": "embed.weight"}
    state = tk.load_state_dict(tmp_path / "back.safetensors")
    assert state["head.weight"] is state["embed.weight"]
    assert_state_equal(state, tied.state_dict())


def test_pt_from_safetensors_stores_each_tensor_alone(tmp_path: Path, net: Net) -> None:
    source = tk.save_weights(net, tmp_path / "net.safetensors")
    convert(source, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=True)
    for name, tensor in loaded.items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


def test_refuses_to_overwrite_without_force(
    tmp_path: Path, net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tk.save_weights(net, tmp_path / "net.pt")
    destination = tmp_path / "net.safetensors"
    destination.write_bytes(b"precious")
    assert main(["convert", str(source), str(destination)]) == 2
    assert "--force" in capsys.readouterr().err
    assert destination.read_bytes() == b"precious"
    with pytest.raises(tk.DestinationExistsError):
        convert(source, destination)
    assert main(["convert", str(source), str(destination), "--force"]) == 0
    assert_state_equal(tk.load_state_dict(destination), net.state_dict())


def test_metadata_that_torch_save_cannot_hold_is_reported(
    tmp_path: Path, net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tk.save_weights(net, tmp_path / "net.safetensors", metadata={"epoch": "3"})
    assert main(["convert", str(source), str(tmp_path / "net.pt")]) == 0
    assert "metadata epoch was not kept" in capsys.readouterr().out


def test_source_is_recognised_by_content(tmp_path: Path, net: Net) -> None:
    liar = tmp_path / "actually_safetensors.bin"
    tk.save_weights(net, tmp_path / "net.safetensors").rename(liar)
    done = convert(liar, tmp_path / "net.pt")
    assert done.source_format.value == "safetensors"
    assert_state_equal(torch.load(tmp_path / "net.pt", weights_only=True), net.state_dict())


@pytest.mark.parametrize(
    ("source_name", "destination_name", "words"),
    [
        ("net.pt", "net.onnx", "cannot tell which format"),
        ("net.pt", "other.pt", "nothing to convert"),
        ("missing.pt", "net.safetensors", "does not exist"),
    ],
)
def test_unsupported_requests_exit_2(
    tmp_path: Path,
    net: Net,
    capsys: pytest.CaptureFixture[str],
    source_name: str,
    destination_name: str,
    words: str,
) -> None:
    tk.save_weights(net, tmp_path / "net.pt")
    code = main(["convert", str(tmp_path / source_name), str(tmp_path / destination_name)])
    assert code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / destination_name).exists()


def test_unstorable_dtype_is_a_typed_error_before_writing(tmp_path: Path) -> None:
    source = tmp_path / "c128.pt"
    torch.save({"z": torch.zeros(2, dtype=torch.complex128)}, source)
    with pytest.raises(tk.FileFormatError, match="complex128"):
        convert(source, tmp_path / "z.safetensors")
    assert not (tmp_path / "z.safetensors").exists()


def test_hostile_source_is_refused_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (print, ("ran",))

    source = tmp_path / "evil.pt"
    source.write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    assert main(["convert", str(source), str(tmp_path / "out.safetensors")]) == 2
    captured = capsys.readouterr()
    assert "ran" not in captured.out
    assert "could run" in captured.err
    assert not (tmp_path / "out.safetensors").exists()


def test_save_weights_to_pt_straight_from_a_mapped_safetensors_file(tmp_path: Path) -> None:
    """The tensors of a mapped file all view one storage, with different dtypes."""
    original = _every_dtype_state()
    source = tk.save_weights(original, tmp_path / "all.safetensors")
    path = tk.save_weights(tk.load_state_dict(source), tmp_path / "all.pt")
    assert path.stat().st_size < source.stat().st_size + 64 * 1024
    assert_state_equal(torch.load(path, weights_only=True), original)


def test_tutorial_checkpoint_becomes_a_restorable_step(tmp_path: Path, net: Net) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    net(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers exist
    source = tmp_path / "tutorial.pt"
    torch.save(
        {
            "epoch": 7,
            "model_state_dict": net.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": 0.25,
        },
        source,
    )
    assert main(["convert", str(source), str(tmp_path / "ckpt")]) == 0
    model = Net()
    fresh = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    restored = tk.CheckpointManager(tmp_path / "ckpt").restore(model=model, optimizer=fresh)
    assert restored.step == 7
    assert restored.metrics == {"loss": 0.25}
    assert_state_equal(net.state_dict(), model.state_dict())
    for param in net.parameters():
        assert torch.equal(
            optimizer.state[param]["momentum_buffer"],
            fresh.state[dict(zip(net.parameters(), model.parameters(), strict=True))[param]][
                "momentum_buffer"
            ],
        )


def test_pickled_whole_model_becomes_a_bundle_only_when_allowed(
    tmp_path: Path, tied: TiedLM, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "legacy_model.pth"
    torch.save(tied, source)
    bundle = tmp_path / "lm.bundle"
    assert main(["convert", str(source), str(bundle)]) == 2
    assert "tests.conftest" in capsys.readouterr().err
    assert not bundle.exists()
    assert main(["convert", str(source), str(bundle), "--allow", "tests.conftest"]) == 0
    loaded = tk.load_model(bundle)
    assert isinstance(loaded, TiedLM)
    assert loaded.head.weight is loaded.embed.weight
    assert_state_equal(tied.state_dict(), loaded.state_dict())
