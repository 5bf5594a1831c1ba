"""Walk through torchkeep's jobs on the tutorial's small CNN and show what each step did."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .. import export_onnx, load_state_dict, load_weights, save_model, save_weights
from ..errors import MissingDependencyError
from ..models import Net
from ._output import EXIT_OK, console, human_bytes
from .export_onnx import print_report


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", type=Path, default=None, help="folder to write into (default: a temporary one)"
    )


def _weights_step(workdir: Path) -> None:
    console.rule("[bold]1. Weights: save a state_dict and load it back")
    torch.manual_seed(0)
    model = Net()
    path = save_weights(model, workdir / "net.safetensors", metadata={"source": "demo"})
    console.print(f"saved {path.name} ({human_bytes(path.stat().st_size)}), atomically")
    fresh = Net()
    report = load_weights(fresh, path)
    console.print(str(report))
    same = all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    console.print(f"bit-identical after the round trip: [bold]{same}[/]")
    legacy = workdir / "tutorial_checkpoint.pt"
    torch.save({"epoch": 5, "model_state_dict": model.state_dict(), "loss": 0.4}, legacy)
    state = load_state_dict(legacy)
    console.print(
        f"read the model part of a tutorial-style torch.save checkpoint "
        f"({len(state)} tensors) without unpickling any code"
    )


_CHILD = """
import sys, torch
{hide}
import torchkeep as tk
torch.manual_seed(1)
x = torch.randn(5, 3, 32, 32)
{load}
torch.save(model(x).detach(), sys.argv[2])
"""


_HIDE_NET = 'sys.modules["torchkeep.models"] = None  # this process cannot import Net'


def _in_subprocess(code: str, bundle: Path, out: Path) -> torch.Tensor:
    subprocess.run([sys.executable, "-c", code, str(bundle), str(out)], check=True)
    result: torch.Tensor = torch.load(out, weights_only=True)
    return result


def _model_step(workdir: Path) -> None:
    console.rule("[bold]2. Whole model: a bundle (no pickle) with a program that needs no code")
    torch.manual_seed(0)
    model = Net().eval()
    bundle = save_model(model, workdir / "net.bundle", example_inputs=torch.randn(1, 3, 32, 32))
    files = ", ".join(sorted(p.name for p in bundle.iterdir()))
    console.print(f"saved {bundle.name}/ ({files}), atomically, with content hashes")
    torch.manual_seed(1)
    expected = model(torch.randn(5, 3, 32, 32))
    by_class = _in_subprocess(
        _CHILD.format(hide="", load="model = tk.load_model(sys.argv[1])"),
        bundle,
        workdir / "by_class.pt",
    )
    console.print(f"another process rebuilt Net from the bundle: same outputs "
                  f"[bold]{torch.equal(by_class, expected)}[/]")  # fmt: skip
    by_program = _in_subprocess(
        _CHILD.format(
            hide=_HIDE_NET, load="model = tk.load_model(sys.argv[1], trust_program=True)"
        ),
        bundle,
        workdir / "by_program.pt",
    )
    close = torch.allclose(by_program, expected, rtol=1e-4, atol=1e-5)
    console.print(
        "a process that cannot import Net ran program.pt2 at batch 5 (exported from a batch-1 "
        f"example): same outputs [bold]{close}[/]"
    )


def _onnx_step(workdir: Path) -> None:
    console.rule("[bold]3. ONNX: export, then prove the file gives PyTorch's numbers")
    torch.manual_seed(0)
    try:
        report = export_onnx(Net(), torch.randn(1, 3, 32, 32), workdir / "net.onnx")
    except MissingDependencyError as exc:
        console.print(f"skipped: {exc}")
        return
    console.print(
        "exported from a batch-1 example, yet the batch stays dynamic: onnxruntime ran the file "
        f"at batch sizes {', '.join(map(str, report.batch_sizes))} on fresh inputs"
    )
    print_report(report)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="torchkeep-demo-") as tmp:
        workdir = args.dir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        _weights_step(workdir)
        _model_step(workdir)
        _onnx_step(workdir)
    return EXIT_OK
