"""The command line never prints a traceback, whatever it is given.

Every command (``demo`` aside) runs in-process over hostile inputs drawn by hypothesis (files with
real magic prefixes, mutated samples of every format, bundles and checkpoints with one document
field replaced and rehashed); each run must exit 0, 1 or 2 and print no ``Traceback``. The top-level
guard is tested directly too (an unexpected error, ``--debug``, ``TORCHKEEP_DEBUG``, Ctrl-C, a
closed pipe), and a few runs go through the real entry point, ``python -m torchkeep``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep as tk
from tests._fuzz import hostile_path, make_bundle, make_checkpoint, write_file
from tests._source import SRC
from torchkeep.cli import inspect as inspect_command
from torchkeep.cli import main

ROOT = Path(__file__).resolve().parents[1]

# command -> its arguments for a hostile input and an output folder.
COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "inspect": lambda path, out: ["inspect", str(path)],
    "inspect --json": lambda path, out: ["inspect", "--json", str(path)],
    "convert": lambda path, out: ["convert", str(path), str(out / "c.safetensors")],
    "convert to a folder": lambda path, out: ["convert", str(path), str(out / "ckpt")],
    "diff": lambda path, out: ["diff", str(path), str(path)],
    "verify": lambda path, out: ["verify", str(path)],
    "scan": lambda path, out: ["scan", str(path)],
    "ls": lambda path, out: ["ls", str(path)],
    "export-onnx": lambda path, out: [
        "export-onnx",
        str(path),
        "-o",
        str(out / "m.onnx"),
        "--input-shape",
        "1,3,32,32",
    ],
}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("fuzz-cli-samples")
    return make_bundle(folder), make_checkpoint(folder)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture
def no_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """``export-onnx`` stops after loading its model: the fuzzing is about the input, and a real
    export takes seconds per example."""

    def refuse(*_: object, **__: object) -> None:
        raise tk.ExportError("export skipped by the test")

    monkeypatch.setattr("torchkeep.cli.export_onnx.export_onnx", refuse)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_command_prints_a_traceback(
    command: str,
    samples: tuple[Path, Path],
    no_export: None,
    capsys: pytest.CaptureFixture[str],
    data: st.DataObject,
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out"
        out.mkdir()
        path = data.draw(hostile_path(Path(folder), *samples), label="input")
        code, output = _run(COMMANDS[command](path, out), capsys)
    assert code in (0, 1, 2), output
    assert "Traceback" not in output


def test_unexpected_error_is_one_line_naming_type_command_and_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(path: Path) -> None:
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(inspect_command, "describe", broken)
    path = tmp_path / "weights.safetensors"
    assert main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    message = " ".join(err.split())
    assert message.startswith("error: unexpected ZeroDivisionError")
    assert str(path) in message
    assert "--debug" in message
    assert "report it" in message
    assert "second line" not in message


@pytest.mark.parametrize("how", ["flag", "flag after the command", "environment"])
def test_debug_shows_the_traceback(
    how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(path: Path) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(inspect_command, "describe", broken)
    argv = {
        "flag": ["--debug", "inspect", "x"],
        "flag after the command": ["inspect", "--debug", "x"],
        "environment": ["inspect", "x"],
    }[how]
    if how == "environment":
        monkeypatch.setenv("TORCHKEEP_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "ZeroDivisionError: boom" in err


def test_typed_and_os_errors_are_exit_2_with_their_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err

    def denied(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(inspect_command, "describe", denied)  # root ignores chmod 000
    assert main(["inspect", str(tmp_path / "locked.pt")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Permission denied" in err
    assert "locked.pt" in err
    assert "unexpected" not in err


def test_ctrl_c_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(path: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_command, "describe", interrupted)
    assert main(["inspect", "x"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_usage_errors_stay_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["no-such-command"], ["diff", "a"], ["diff", "a", "b", "--rtol", "-1"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_hostile_text_from_a_file_is_shown_literally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rich markup in a file's names must not style (or crash) the output."""
    folder = tmp_path / "[bold]x[red]"
    folder.mkdir()
    path = write_file(folder, ".pt", b"\x80\x02[/]\x1b[31m")
    assert main(["scan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[bold]x[red]" in err
    assert "\x1b" not in err


# ---- the real entry point -----------------------------------------------------------------


def _torchkeep(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("TORCHKEEP_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "torchkeep", *args],
        capture_output=True, text=True, env=env, timeout=120, check=False, **kwargs,  # type: ignore[call-overload]
    )  # fmt: skip


def test_entry_point_refuses_garbage_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    path = write_file(tmp_path, ".onnx", b"\x08\x07" + os.urandom(64))
    result = _torchkeep("inspect", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert str(path) in " ".join(result.stderr.split())


def test_entry_point_usage_error_is_exit_2(tmp_path: Path) -> None:
    result = _torchkeep("inspect")
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("output", ["--json", "--limit=0"])  # plain JSON, rich tables
def test_entry_point_closed_pipe_is_quiet(tmp_path: Path, output: str) -> None:
    """`torchkeep inspect FILE | head -0`: the reader is gone before the first write."""
    path = tmp_path / "w.safetensors"
    tk.save_weights({f"t{i}": torch.zeros(1) for i in range(200)}, path)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "torchkeep", "inspect", output, str(path)],
            stdout=writer, stderr=subprocess.PIPE, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert result.stderr == ""
    assert result.returncode == 0


def test_entry_point_debug_flag_after_the_command(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    path = write_file(tmp_path, ".onnx", b"\xff" * 8)
    result = _torchkeep("inspect", "--debug", str(path))
    assert result.returncode == 2
    assert "not a readable ONNX file" in result.stderr
    assert "Traceback" in result.stderr  # --debug shows it even for a typed error
