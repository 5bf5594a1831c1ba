"""Walk through torchkeep's jobs on the tutorial's small CNN and show what each step did."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, TensorDataset

from .. import CheckpointManager, load_state_dict, load_weights, save_weights
from ..models import Net
from ._output import EXIT_OK, console, human_bytes
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
        _checkpoint_step(workdir)
    return EXIT_OK
