"""Usability fixes: RNG summaries, whole names in logs, --json everywhere, README snippets."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests._source import SRC
from torchkeep.cli import main
from torchkeep.cli._output import RULE_WIDTH, _Console
from torchkeep.convert import convert
from torchkeep.models import Net

from .conftest import assert_state_equal

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_STEP_FOLDER = ROOT / "tests" / "golden" / "torchkeep-0.1.0" / "ckpt"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``torchkeep ARGS`` in a subprocess whose stdout is a pipe (not a terminal)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    # The torchkeep this test imported (the mutation check runs tests against a copy of src/).
    environment["PYTHONPATH"] = str(SRC)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "torchkeep", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(3, model=Net(), epoch=1, loader_gen=torch.Generator().manual_seed(5))
    return tmp_path / "ckpt"


@pytest.mark.parametrize("where", ["folder", "step", "golden-0.1.0"])
def test_inspect_summarises_random_generator_states(
    checkpoint: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = {
        "folder": checkpoint,
        "step": checkpoint / "step-00000003",
        "golden-0.1.0": GOLDEN_STEP_FOLDER,
    }[where]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "random generators" in out
    assert re.search(r"python\s+.\s+Python random \(version 3\), 625 words, hash [0-9a-f]{12}", out)
    assert re.search(r"torch\s+.\s+torch CPU generator, 5056 bytes", out)
    # No run of the Mersenne Twister's numbers: the state itself is never printed.
    assert not re.search(r"(\d{6,}, ){5}", out)
    assert len(out.splitlines()) < 80
    assert main(["inspect", "--json", str(path)]) == 0
    sections = json.loads(capsys.readouterr().out)["sections"]
    assert "625 words" in sections["random generators"]["python"]
    assert "rng" not in sections.get("values", {})


def test_inspect_hash_tells_two_generator_states_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    random.seed(1)
    mgr.save(1, epoch=0)
    random.random()
    mgr.save(2, epoch=0)
    hashes = []
    for step in (1, 2):
        assert main(["inspect", "--json", str(tmp_path / "ckpt" / f"step-0000000{step}")]) == 0
        hashes.append(json.loads(capsys.readouterr().out)["sections"]["random generators"])
    assert hashes[0]["python"] != hashes[1]["python"]


def test_inspect_of_a_tutorial_checkpoint_shortens_long_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tutorial.pt"
    torch.save({"model_state_dict": Net().state_dict(), "rng_state": random.getstate()}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rng_state" in out
    assert not re.search(r"(\d{6,}, ){40}", out)


def test_output_to_a_pipe_is_not_wrapped(tmp_path: Path) -> None:
    """Names longer than a terminal stay whole on one line when stdout is not a terminal."""
    name = "encoder." + ".".join(f"block_{i}_with_a_long_descriptive_name" for i in range(6))
    path = tk.save_weights({name: torch.zeros(2)}, tmp_path / "long.safetensors")
    result = _cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert any(name in line for line in result.stdout.splitlines())
    narrow = _cli("inspect", str(path), env={"COLUMNS": "60"})  # an explicit width still wins
    assert not any(name in line for line in narrow.stdout.splitlines())


def test_rules_off_a_terminal_stay_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's section rules are not drawn 65,536 characters wide into a log or a pipe,
    while a table beside them is still not wrapped."""
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    console = _Console(file=out, highlight=False)
    console.rule("[bold]1. Weights")
    console.print("x" * 300)
    rule, text = out.getvalue().splitlines()
    assert "1. Weights" in rule
    assert len(rule) == RULE_WIDTH
    assert text == "x" * 300


def _prepare_every_command(tmp_path: Path) -> dict[str, list[str]]:
    net = Net()
    a = tk.save_weights(net, tmp_path / "a.safetensors")
    b = tk.save_weights(net, tmp_path / "b.pt")
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, model=net)
    torch.save({"epoch": 1, "model_state_dict": net.state_dict()}, tmp_path / "tutorial.pt")
    return {
        "inspect": ["inspect", str(a)],
        "ls": ["ls", str(tmp_path / "ckpt")],
        "verify": ["verify", str(tmp_path / "ckpt")],
        "scan": ["scan", str(b)],
        "diff": ["diff", str(a), str(b)],
        "convert": ["convert", str(tmp_path / "tutorial.pt"), str(tmp_path / "imported")],
    }


def test_every_data_command_has_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command, args in _prepare_every_command(tmp_path).items():
        assert main([*args, "--json"]) == 0, command
        json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["export-onnx", "--help"])
    assert "--json" in capsys.readouterr().out


def test_convert_into_a_directory_counts_what_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"epoch": 2, "model_state_dict": net.state_dict(), "optimizer": opt.state_dict()}
    torch.save(state, tmp_path / "tutorial.pt")
    assert main(["convert", str(tmp_path / "tutorial.pt"), str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert ": 0 tensors" not in out
    assert ": 20 tensors" in out  # 10 model tensors, 10 momentum buffers
    done = convert(tmp_path / "tutorial.pt", tmp_path / "ckpt2")
    assert done.tensors == 20


def test_an_empty_folder_error_reads_well(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(tk.CheckpointNotFoundError) as info:
        tk.CheckpointManager(tmp_path / "ckpt").restore(model=Net())
    assert "holds no valid step" in str(info.value)
    assert "no a " not in str(info.value)


# --------------------------------------------------------------------------------------------
# README snippets

# The corrected checkpoint snippet of the README (section 4): it checks `latest_step` before
# restoring, so its first run on an empty folder works. The test runs the README's own block
# when README.md marks it with CHECKPOINT_MARKER, else this copy (the same text, given to the
# README in the notes).
CHECKPOINT_MARKER = "<!-- test: checkpoint-snippet -->"


def _checkpoint_snippet() -> str:
    """The checkpoint snippet exactly as the README shows it (the block after the marker)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert CHECKPOINT_MARKER in readme, f"README.md lost the line {CHECKPOINT_MARKER}"
    block = re.search(r"```python\n(.*?)```", readme.split(CHECKPOINT_MARKER, 1)[1], re.DOTALL)
    assert block is not None, f"no ```python block after {CHECKPOINT_MARKER} in README.md"
    return block.group(1)


def _run_snippet(folder: Path, epochs: int, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """Run the snippet in ``folder`` with fresh objects, as a new process would."""
    monkeypatch.chdir(folder)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    # A resumed process starts from other generator states: the restore must set them.
    torch.manual_seed(2000 if (folder / "ckpt").exists() else 1000)

    def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> float:
        x = torch.randn(16, 4)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return float(loss.detach())

    namespace = {
        "model": model,
        "opt": opt,
        "sched": sched,
        "epochs": epochs,
        "train_one_epoch": train_one_epoch,
    }
    exec(compile(_checkpoint_snippet(), "README.md checkpoint snippet", "exec"), namespace)
    return model


def test_readme_checkpoint_snippet_runs_fresh_and_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First run on an empty folder (2 epochs), then a resumed run to 4 epochs: the weights
    equal an uninterrupted 4-epoch run's bit for bit."""
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    reference = _run_snippet(tmp_path / "straight", 4, monkeypatch)
    _run_snippet(tmp_path / "resumed", 2, monkeypatch)
    assert tk.CheckpointManager(tmp_path / "resumed" / "ckpt").steps == [0, 1]
    resumed = _run_snippet(tmp_path / "resumed", 4, monkeypatch)
    assert tk.CheckpointManager(tmp_path / "resumed" / "ckpt").latest_step == 3
    assert_state_equal(resumed.state_dict(), reference.state_dict())


# Install commands the README gives for a checkout (the notes hold the text): each must be a
# form pip accepts, with extras that pyproject.toml defines. Checked offline with a dry run.
INSTALL_FORMS = [
    ["-e", "."],
    ["-e", ".[onnx]"],
    [".[all]"],
    ["./{checkout}[onnx]"],
]


@pytest.mark.parametrize("form", INSTALL_FORMS, ids=lambda f: " ".join(f))
def test_readme_install_commands_work_from_a_checkout(form: list[str]) -> None:
    cwd = ROOT.parent if "{checkout}" in form[-1] else ROOT
    args = [arg.replace("{checkout}", ROOT.name) for arg in form]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
         "--no-build-isolation", "--quiet", "--report", "-", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (install,) = json.loads(result.stdout)["install"]
    assert install["metadata"]["name"] == "torchkeep"
    wanted = re.findall(r"\[(\w+)\]", args[-1])
    assert set(wanted) <= set(install["metadata"].get("provides_extra", []))
    assert install.get("requested_extras", []) == wanted
