"""MNIST the pytorch/examples way, checkpointed with torchkeep so a killed run resumes exactly.

    python examples/mnist.py --epochs 2 --save-dir /tmp/mnist

Kill it at any moment (Ctrl-C, SIGKILL, a pre-empted machine) and run the same command again:
it continues from the newest valid checkpoint in ``--save-dir`` and ends with the weights an
uninterrupted run ends with, bit for bit. Checkpoints are written every ``--save-interval``
steps and at the end of every epoch. The images are synthetic (MNIST-shaped, one noisy pattern
per digit, made in code), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import epoch_loader, make_deterministic
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk


class Net(nn.Module):
    """Two convolutions, max-pooling, dropout and two linear layers (the mnist example's net)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(12 * 12 * 64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.relu(self.fc1(torch.flatten(self.dropout1(x), 1)))
        return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)


def synthetic_mnist(train_size: int, test_size: int, seed: int) -> tuple[TensorDataset, ...]:
    """Train and test sets of 1x28x28 images: one fixed pattern per digit plus noise."""
    generator = torch.Generator().manual_seed(seed)
    patterns = (torch.rand(10, 1, 28, 28, generator=generator) > 0.8).float()
    sets = []
    for size in (train_size, test_size):
        labels = torch.randint(0, 10, (size,), generator=generator)
        images = 0.5 * patterns[labels] + torch.rand(size, 1, 28, 28, generator=generator)
        sets.append(TensorDataset((images - 0.1307) / 0.3081, labels))
    return tuple(sets)


def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int) -> tuple[float, float]:
    """Average loss and accuracy on ``dataset``."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            output = model(x)
            loss += F.nll_loss(output, y, reduction="sum").item()
            correct += int((output.argmax(dim=1) == y).sum())
    return loss / len(dataset), correct / len(dataset)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The mnist example's flags, with tiny defaults, plus the checkpoint ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--test-batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7, help="learning rate step gamma")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-interval", type=int, default=8, help="steps between log lines")
    parser.add_argument("--train-size", type=int, default=512, help="synthetic training images")
    parser.add_argument("--test-size", type=int, default=256, help="synthetic test images")
    parser.add_argument("--save-dir", type=Path, default=Path("checkpoints/mnist"))
    parser.add_argument("--save-interval", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    parser.add_argument(
        "--save-model", action="store_true", help="also write mnist_cnn.safetensors"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, checkpointing as it goes; resume from ``--save-dir`` if it holds a step."""
    args = parse_args(argv)
    make_deterministic(args.seed)
    train_set, test_set = synthetic_mnist(args.train_size, args.test_size, args.seed)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)
    mgr = tk.CheckpointManager(args.save_dir, keep_last=args.keep_last)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    step, epoch, batch = 0, 1, 0  # steps done; the epoch and batch to run next
    if mgr.latest_step is not None:  # restore() raises CheckpointNotFoundError on an empty folder
        restored = mgr.restore(**state)  # the newest valid step, model, optimizer, RNGs and all
        step, epoch, batch = restored.step, restored.extra["epoch"], restored.extra["batch"]
        print(f"resumed from step {step} (epoch {epoch}, batch {batch})")
    first_step = step
    batches = math.ceil(len(train_set) / args.batch_size)
    accuracy = None
    while epoch <= args.epochs:
        model.train()
        loader = epoch_loader(
            train_set, args.batch_size, seed=args.seed, epoch=epoch, start_batch=batch
        )
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            optimizer.step()
            step, batch = step + 1, batch + 1
            if step % args.log_interval == 0:
                print(f"epoch {epoch} [{batch}/{batches}] step {step} loss {loss.item():.4f}")
            if step % args.save_interval == 0 and batch < batches:  # the epoch end saves below
                mgr.save(step, **state, epoch=epoch, batch=batch)
        test_loss, accuracy = evaluate(model, test_set, args.test_batch_size)
        print(f"epoch {epoch} test: loss {test_loss:.4f}, accuracy {accuracy:.1%}")
        scheduler.step()
        epoch, batch = epoch + 1, 0
        metrics = {"test_loss": test_loss, "accuracy": accuracy}
        mgr.save(step, **state, metrics=metrics, epoch=epoch, batch=batch)
    if args.save_model:
        tk.save_weights(model, args.save_dir / "mnist_cnn.safetensors")
    done = f"test accuracy {accuracy:.1%}" if accuracy is not None else "nothing left to train"
    print(f"mnist: steps {first_step}->{step}, {done}, checkpoints {mgr.steps} in {args.save_dir}")


if __name__ == "__main__":
    main()
