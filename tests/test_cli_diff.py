"""``torchkeep diff``: exit 0 equal, 1 different, 2 error; differences per key and dtype."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep as tk
from torchkeep import compare
from torchkeep.cli import main
from torchkeep.compare import Status, compare_tensors, diff_files
from torchkeep.models import Net


def _diff_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["diff", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_same_weights_in_two_formats_exit_0(
    tmp_path: Path, net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "net.pt"
    torch.save({"epoch": 1, "model_state_dict": net.state_dict()}, a)
    b = tk.save_weights(net, tmp_path / "net.safetensors")
    code, out = _diff_json(capsys, str(a), str(b))
    assert code == 0
    assert out["equal"] is True
    assert out["counts"]["identical"] == len(net.state_dict())
    assert main(["diff", str(a), str(b)]) == 0
    assert "equal" in capsys.readouterr().out


def test_changed_value_exits_1_and_reports_max_difference(
    tmp_path: Path, net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tk.save_weights(net, tmp_path / "a.safetensors")
    with torch.no_grad():
        net.fc1.bias[3] += 0.5
    b = tk.save_weights(net, tmp_path / "b.pt")
    code, out = _diff_json(capsys, str(a), str(b))
    assert code == 1
    changed = [t for t in out["tensors"] if t["status"] != "identical"]
    assert [t["name"] for t in changed] == ["fc1.bias"]
    assert changed[0]["status"] == "different"
    assert changed[0]["max_abs_diff"] == pytest.approx(0.5, rel=1e-6)
    assert changed[0]["outside_tolerance"] == 1
    assert main(["diff", str(a), str(b)]) == 1
    out_text = capsys.readouterr().out
    assert "fc1.bias" in out_text
    assert "different" in out_text


def test_tolerance_turns_a_small_difference_into_equal(
    tmp_path: Path, net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tk.save_weights(net, tmp_path / "a.safetensors")
    with torch.no_grad():
        net.fc1.weight.mul_(1 + 1e-6)
    b = tk.save_weights(net, tmp_path / "b.safetensors")
    assert main(["diff", str(a), str(b)]) == 1
    capsys.readouterr()
    code, out = _diff_json(capsys, str(a), str(b), "--rtol", "1e-5")
    assert code == 0
    assert out["counts"]["close"] == 1
    code, _ = _diff_json(capsys, str(a), str(b), "--atol", "1e-12")
    assert code == 1


def test_keys_dtypes_and_shapes_that_changed_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tk.save_weights(
        {
            "kept": torch.ones(2),
            "gone": torch.ones(1),
            "cast": torch.ones(3),
            "grown": torch.ones(2),
        },
        tmp_path / "a.safetensors",
    )
    b = tk.save_weights(
        {
            "kept": torch.ones(2),
            "new": torch.ones(1),
            "cast": torch.ones(3, dtype=torch.bfloat16),
            "grown": torch.ones(4),
        },
        tmp_path / "b.safetensors",
    )
    code, out = _diff_json(capsys, str(a), str(b))
    assert code == 1
    assert out["only_in_a"] == ["gone"]
    assert out["only_in_b"] == ["new"]
    by_name = {t["name"]: t for t in out["tensors"]}
    assert by_name["cast"]["status"] == "dtype changed"
    assert by_name["cast"]["dtype"] == ["float32", "bfloat16"]
    assert by_name["cast"]["max_abs_diff"] == 0.0  # 1.0 is exact in bfloat16
    assert by_name["grown"]["status"] == "shape changed"
    assert by_name["grown"]["shape"] == [[2], [4]]
    assert by_name["grown"]["max_abs_diff"] is None
    assert by_name["kept"]["status"] == "identical"


@pytest.mark.parametrize(
    "args",
    [
        ["missing.safetensors", "b.safetensors"],
        ["empty.safetensors", "b.safetensors"],
        ["b.safetensors", "b.safetensors", "--rtol", "-1"],
    ],
)
def test_errors_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, net: Net, args: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    tk.save_weights(net, tmp_path / "b.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    try:
        code = main(["diff", *args])
    except SystemExit as exc:  # argparse refuses a bad option value
        code = int(exc.code or 0)
    assert code == 2


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ],
)
def test_every_dtype_compares_equal_to_itself_and_sees_a_change(dtype: torch.dtype) -> None:
    base = torch.tensor([0.0, 1.0, 2.0, 4.0]).to(dtype)
    assert compare_tensors("t", base, base.clone()).status == Status.IDENTICAL
    changed = base.clone()
    changed[1] = torch.tensor(0.0).to(dtype)
    result = compare_tensors("t", base, changed)
    assert result.status == Status.DIFFERENT
    assert result.max_abs_diff == 1.0
    assert result.outside == 1


def test_nan_inf_and_negative_zero() -> None:
    nan, inf = math.nan, math.inf
    a = torch.tensor([nan, inf, -0.0, 1.0])
    assert compare_tensors("t", a, torch.tensor([nan, inf, 0.0, 1.0])).status == Status.CLOSE
    one_nan = compare_tensors("t", a, torch.tensor([1.0, inf, 0.0, 1.0]), rtol=1.0)
    assert one_nan.status == Status.DIFFERENT
    assert one_nan.max_abs_diff == inf
    assert one_nan.to_json()["max_abs_diff"] == "inf"
    inf_vs_finite = compare_tensors("t", torch.tensor([1.0]), torch.tensor([inf]), rtol=1.0)
    assert inf_vs_finite.status == Status.DIFFERENT


def test_large_integers_differing_by_one_are_different() -> None:
    a = torch.tensor([2**62], dtype=torch.int64)
    result = compare_tensors("t", a, a + 1)
    assert result.status == Status.DIFFERENT  # float64 alone would call them equal


def test_big_tensors_are_compared_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compare, "CHUNK_ELEMENTS", 7)
    a = torch.arange(100, dtype=torch.float32)
    b = a.clone()
    b[3], b[95] = -1.0, 1000.0
    result = compare_tensors("t", a.reshape(10, 10), b.reshape(10, 10))
    assert result.outside == 2
    assert result.max_abs_diff == 905.0
    assert compare_tensors("t", a.t(), a.t().clone()).status == Status.IDENTICAL


def test_diff_files_reads_tied_names_on_both_sides(tmp_path: Path) -> None:
    shared = torch.randn(4, 3)
    a = tk.save_weights({"embed": shared, "head": shared}, tmp_path / "a.safetensors")
    b = tmp_path / "b.pt"
    torch.save({"embed": shared.clone(), "head": shared.clone()}, b)
    report = diff_files(a, b)
    assert report.equal
    assert [t.name for t in report.tensors] == ["embed", "head"]
