"""``torchkeep inspect``: tables and JSON from describe(), in process and through ``python -m``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from tests._source import SRC
from tests.conftest import TiedLM
from torchkeep import describe as describe_module
from torchkeep.cli import main
from torchkeep.describe import Description
from torchkeep.formats import Format
from torchkeep.models import Net


def test_json_lists_format_tensors_totals_metadata_and_ties(
    tmp_path: Path, tied: TiedLM, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tk.save_weights(tied, tmp_path / "lm.safetensors", metadata={"epoch": "7"})
    assert main(["inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "safetensors"
    assert out["size"] == path.stat().st_size
    tensors = {t["name"]: t for t in out["tensors"]}
    assert sorted(tensors) == ["embed.weight", "norm.bias", "norm.weight"]
    assert tensors["embed.weight"] == {
        "name": "embed.weight",
        "dtype": "F32",
        "shape": [50, 8],
        "nbytes": 50 * 8 * 4,
    }
    assert out["parameter_count"] == 50 * 8 + 8 + 8
    assert out["tensor_bytes"] == out["parameter_count"] * 4
    assert out["metadata"]["epoch"] == "7"
    assert out["tied"] == {"embed.weight": ["head.weight"]}


def test_table_shows_summary_tensors_metadata_and_ties(
    tmp_path: Path, tied: TiedLM, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tk.save_weights(tied, tmp_path / "lm.safetensors", metadata={"epoch": "7"})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for expected in ["safetensors", "416", "embed.weight", "[50, 8]", "epoch", "head.weight"]:
        assert expected in out


def test_torch_checkpoint_shows_its_other_values(
    tmp_path: Path, net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 5, "model_state_dict": net.state_dict(), "loss": 0.25}, path)
    assert main(["inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "torch-zip"
    assert out["parameter_count"] == sum(p.numel() for p in net.parameters())
    assert out["sections"]["values"] == {"epoch": "5", "loss": "0.25"}


def test_limit_caps_the_tensor_rows_and_says_how_many_more(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = {f"layer{i:03d}": torch.zeros(2) for i in range(120)}
    path = tk.save_weights(state, tmp_path / "many.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer049" in out
    assert "layer050" not in out
    assert "... 70 more" in out
    assert main(["inspect", str(path), "--limit", "0"]) == 0
    assert "layer119" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json", "--limit", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tensors"]) == 120


def test_sections_and_notes_from_other_describers_are_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake_onnx(path: Path) -> Description:
        description = Description(path, Format.ONNX, 123)
        description.sections["inputs"] = [("x", "float32[batch, 3, 32, 32]")]
        description.notes.append("opset 18")
        return description

    monkeypatch.setitem(describe_module.DESCRIBERS, Format.ONNX, fake_onnx)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08\x07 not really onnx")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "inputs" in out
    assert "float32[batch, 3, 32, 32]" in out
    assert "note: opset 18" in out


def test_hostile_names_are_printed_literally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "[/]\x1b[2J[bold]"
    path = tk.save_weights({name: torch.zeros(1)}, tmp_path / "x.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[/]\\x1b[2J[bold]" in out
    assert "\x1b" not in out


@pytest.mark.parametrize(
    ("content", "code", "words"),
    [
        (None, 2, "does not exist"),
        (b"", 2, "empty"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}", 2, "not a valid safetensors file"),
    ],
)
def test_unreadable_files_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, code: int, words: str
) -> None:
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    assert main(["inspect", str(path)]) == code
    assert words in capsys.readouterr().err


def test_console_entry_point_runs_in_a_subprocess(tmp_path: Path, net: Net) -> None:
    path = tk.save_weights(net, tmp_path / "net.safetensors")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "torchkeep", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["parameter_count"] == sum(p.numel() for p in net.parameters())
