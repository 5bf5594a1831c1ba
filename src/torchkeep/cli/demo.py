"""Walk through torchkeep's jobs on the tutorial's small CNN and show what each step did."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, TensorDataset

from .. import (
    CheckpointManager,
    export_onnx,
    load_state_dict,
    load_weights,
    save_model,
    save_weights,
)
from ..compat import program_loader_examined
from ..errors import MissingDependencyError
from ..models import Net
from ._output import EXIT_OK, console, human_bytes
from .export_onnx import print_report
from .ls import print_steps

_EPOCHS = 4
_PREEMPTED_AFTER = 2


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", type=Path, default=None, help="folder to write into (default: a temporary one)"
    )


def _weights_step(workdir: Path) -> None:
    console.rule("[bold]1. Weights: save a state_dict and load it back")
    torch.manual_seed(0)
    model = Net()
    path = workdir / "net.safetensors"
    save_weights(model, path, metadata={"source": "demo"})
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
    bundle = workdir / "net.bundle"
    save_model(model, bundle, example_inputs=torch.randn(1, 3, 32, 32))
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
    if not program_loader_examined():
        console.print(
            f"(the program step is skipped: torchkeep loads programs only under a torch whose "
            f"loader its scan was checked against, and this is torch {torch.__version__})"
        )
        return
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


def _train_epochs(
    mgr: CheckpointManager, first: int, last: int, *, stop_after: int | None = None
) -> None:
    """Train epochs ``first..last-1`` (resuming from ``mgr`` if it has a step), one save each."""
    model = Net(dropout=0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    if mgr.latest_step is not None:
        restored = mgr.restore(model=model, optimizer=optimizer)
        first = restored.extra["epoch"] + 1
        console.print(
            f"resumed from step {restored.step} (epoch {restored.extra['epoch']}, "
            f"loss {restored.metrics['loss']:.4f}): weights, momentum and RNG state restored"
        )
    data = torch.Generator().manual_seed(0)
    dataset = TensorDataset(
        torch.randn(512, 3, 32, 32, generator=data), torch.randint(0, 10, (512,), generator=data)
    )
    loader = DataLoader(dataset, batch_size=32, shuffle=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    with Progress(console=console, transient=False) as progress:
        for epoch in range(first, last):
            task = progress.add_task(f"epoch {epoch}", total=len(loader))
            total = 0.0
            for inputs, labels in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(inputs), labels)
                loss.backward()
                optimizer.step()
                total += loss.item()
                progress.advance(task)
            step = (epoch + 1) * len(loader)
            mgr.save(
                step,
                model=model,
                optimizer=optimizer,
                metrics={"loss": total / len(loader)},
                epoch=epoch,
            )
            if stop_after is not None and epoch + 1 == first + stop_after:
                break
    if stop_after is not None:
        console.print(f"[yellow]preempted[/] after epoch {epoch} (step {step} committed)")


def _checkpoint_step(workdir: Path) -> None:
    console.rule("[bold]4. Training checkpoints: train, get preempted, resume, list")
    directory = workdir / "checkpoints"
    torch.manual_seed(0)

    def manager() -> CheckpointManager:
        return CheckpointManager(directory, keep_last=2, keep_best=1, monitor="loss")

    _train_epochs(manager(), 0, _EPOCHS, stop_after=_PREEMPTED_AFTER)
    # a new process would do exactly this: build the objects, then restore the latest step
    _train_epochs(manager(), 0, _EPOCHS)
    print_steps(directory)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="torchkeep-demo-") as tmp:
        workdir = args.dir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        _weights_step(workdir)
        _model_step(workdir)
        _onnx_step(workdir)
        _checkpoint_step(workdir)
    return EXIT_OK
