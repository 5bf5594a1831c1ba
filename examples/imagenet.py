"""ImageNet-style training (the pytorch/examples imagenet loop with ``--dummy`` data), checkpointed
with torchkeep: resumes exactly after a kill and keeps the best step by validation accuracy.

    python examples/imagenet.py --epochs 3 --save-dir /tmp/imagenet
    python examples/imagenet.py --save-dir /tmp/imagenet --evaluate   # the best step's accuracy

The data is synthetic, like ``--dummy``: each image is drawn from a generator seeded by its
index (so it is the same every time it is read) around a per-class colour, so the accuracy
rises. The model is a small ResNet (basic blocks, batch norm) defined here; SGD with momentum
and weight decay, a cosine or step learning-rate schedule stepped per epoch. Checkpoints are
written every ``--save-interval`` steps and after every validation; retention keeps the last
two and the best one by ``acc1`` (``keep_best=1, monitor="acc1", mode="max"``).
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
from torch.utils.data import DataLoader, Dataset

import torchkeep as tk


class FakeImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``size`` random 3xSxS images, the same for the same index; class means differ."""

    def __init__(self, size: int, image_size: int, classes: int, seed: int) -> None:
        self.size, self.image_size, self.classes, self.seed = size, image_size, classes, seed
        self.means = torch.randn(classes, 3, 1, 1, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        label = torch.randint(0, self.classes, (), generator=generator)
        shape = (3, self.image_size, self.image_size)
        return self.means[label] + torch.randn(shape, generator=generator), label


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a 1x1 projection when needed)."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A stem and three stages of basic blocks (width w, 2w, 4w), pooling, a linear head."""

    def __init__(self, classes: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class AverageMeter:
    """The latest value and the running average of a quantity."""

    def __init__(self) -> None:
        self.value, self.sum, self.count = 0.0, 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.value, self.sum, self.count = value, self.sum + value * n, self.count + n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


def accuracy(output: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """The share of samples whose target is among the ``k`` highest outputs, in percent."""
    top = output.topk(min(k, output.shape[1]), dim=1).indices
    return 100.0 * (top == target[:, None]).any(dim=1).float().mean().item()


def validate(model: nn.Module, dataset: FakeImages, batch_size: int) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy on ``dataset``."""
    model.eval()
    meters = {"val_loss": AverageMeter(), "acc1": AverageMeter(), "acc5": AverageMeter()}
    with torch.no_grad():
        for images, target in DataLoader(dataset, batch_size=batch_size):
            output = model(images)
            n = len(target)
            meters["val_loss"].update(F.cross_entropy(output, target).item(), n)
            meters["acc1"].update(accuracy(output, target, 1), n)
            meters["acc5"].update(accuracy(output, target, 5), n)
    return {name: meter.avg for name, meter in meters.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The imagenet example's flags, with tiny defaults, plus the checkpoint ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4)
    parser.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    parser.add_argument("--lr-step", type=int, default=30, help="epochs per 10x decay (step)")
    parser.add_argument("-p", "--print-freq", type=int, default=4, help="steps between logs")
    parser.add_argument("-j", "--workers", type=int, default=0, help="data loading workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=256, help="synthetic training images")
    parser.add_argument("--val-size", type=int, default=128, help="synthetic validation images")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--save-dir", type=Path, default=Path("checkpoints/imagenet"))
    parser.add_argument("--save-interval", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in background")
    parser.add_argument("-e", "--evaluate", action="store_true", help="validate the best step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train (or ``--evaluate``), checkpointing as it goes; resume from ``--save-dir``."""
    args = parse_args(argv)
    make_deterministic(args.seed)
    train_set = FakeImages(args.train_size, args.image_size, args.classes, args.seed)
    val_set = FakeImages(args.val_size, args.image_size, args.classes, args.seed + 1)
    val_set.means = train_set.means  # the same classes
    model = ResNet(args.classes, args.width)
    optimizer = torch.optim.SGD(
        model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=0.1)
    mgr = tk.CheckpointManager(
        args.save_dir,
        keep_last=2,
        keep_best=1,
        monitor="acc1",
        mode="max",
        async_save=args.async_save,
    )
    if args.evaluate:
        if mgr.best_step is None:
            raise SystemExit(f"no validated checkpoint in {args.save_dir}: train first")
        best = mgr.restore("best", model=model, restore_rng=False)
        metrics = validate(model, val_set, args.batch_size)
        print(f"best step {best.step}: acc@1 {metrics['acc1']:.1f} acc@5 {metrics['acc5']:.1f}")
        return
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    step, epoch, batch, best_acc1 = 0, 0, 0, 0.0  # steps done; the epoch and batch to run next
    if mgr.latest_step is not None:  # restore() raises CheckpointNotFoundError on an empty folder
        restored = mgr.restore(**state)
        step, epoch, batch = restored.step, restored.extra["epoch"], restored.extra["batch"]
        best_acc1 = restored.extra["best_acc1"]
        print(f"resumed from step {step} (epoch {epoch}, batch {batch})")
    first_step = step
    batches = math.ceil(len(train_set) / args.batch_size)
    while epoch < args.epochs:
        model.train()
        loss_meter, acc_meter = AverageMeter(), AverageMeter()
        loader = epoch_loader(
            train_set,
            args.batch_size,
            seed=args.seed,
            epoch=epoch,
            start_batch=batch,
            num_workers=args.workers,
        )
        for images, target in loader:
            output = model(images)
            loss = F.cross_entropy(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step, batch = step + 1, batch + 1
            loss_meter.update(loss.item(), len(target))
            acc_meter.update(accuracy(output, target, 1), len(target))
            if step % args.print_freq == 0:
                print(
                    f"epoch [{epoch}][{batch:>3}/{batches}] loss {loss_meter.value:.3f} "
                    f"({loss_meter.avg:.3f}) acc@1 {acc_meter.value:5.1f} ({acc_meter.avg:5.1f})"
                )
            if step % args.save_interval == 0 and batch < batches:  # the epoch end saves below
                mgr.save(step, **state, epoch=epoch, batch=batch, best_acc1=best_acc1)
        metrics = validate(model, val_set, args.batch_size)
        best_acc1 = max(best_acc1, metrics["acc1"])
        print(f"epoch {epoch} val: acc@1 {metrics['acc1']:.1f} acc@5 {metrics['acc5']:.1f}")
        scheduler.step()
        epoch, batch = epoch + 1, 0
        mgr.save(step, **state, metrics=metrics, epoch=epoch, batch=batch, best_acc1=best_acc1)
    mgr.wait()  # an async save still in flight has committed (or raised) after this
    print(
        f"imagenet: steps {first_step}->{step}, best acc@1 {best_acc1:.1f} "
        f"(step {mgr.best_step}), checkpoints {mgr.steps} in {args.save_dir}"
    )


if __name__ == "__main__":
    main()
