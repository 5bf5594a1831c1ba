"""Save time per checkpoint: each framework's own checkpointing against torchkeep's, same run.

    python benchmarks/bench_integrations.py [--mib 64] [--repeat 5] [--dir DIR] [--quick]

One process, one model per framework of about ``--mib`` MiB of float32 weights (plus AdamW
state, twice that), trained for a few steps so every state exists, then saved alternately by
the framework's own code and by torchkeep's integration, ``--repeat`` rounds after one
warm-up save each (median):

- Lightning: ``TorchCheckpointIO.save_checkpoint`` (``torch.save``, no fsync) against
  ``TorchkeepCheckpointIO.save_checkpoint`` (hashes, fsync, atomic commit, RNG) on the same
  checkpoint dict Lightning built; a torch.save followed by an fsync is shown too.
- HF Trainer: ``Trainer._save_checkpoint`` (model.safetensors, optimizer.pt, ...) against
  ``TorchkeepTrainer._save_checkpoint`` on the same trainer, and the seal callback's cost alone.
- Accelerate: ``accelerator.save_state()`` against ``torchkeep.integrations.accelerate.save_state``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _harness import common_parser

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")


def medians(fns: list[Callable[[int], object]], repeats: int) -> list[float]:
    """Median wall time of each ``fn(i)`` over ``repeats`` rounds, the functions interleaved
    within a round so that a busy moment of the machine hits all of them (``i`` keeps paths
    apart); one untimed warm-up call each first."""
    for fn in fns:
        fn(-1)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn(i)
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def _mlp(mib: float) -> nn.Module:
    width = 1024  # one 1024x1024 float32 layer is 4 MiB
    layers = max(1, round(mib / 4))
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def lightning(mib: float, repeats: int, workdir: Path) -> tuple[float, float, float]:
    import lightning as L
    from lightning.fabric.plugins import TorchCheckpointIO

    from torchkeep.integrations.lightning import TorchkeepCheckpointIO

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp(mib)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    data = torch.utils.data.TensorDataset(torch.randn(8, 1024))
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=4))
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    own, ours = TorchCheckpointIO(), TorchkeepCheckpointIO()

    def synced(i: int) -> None:
        own.save_checkpoint(checkpoint, workdir / f"synced-{i}.ckpt")
        with open(workdir / f"synced-{i}.ckpt", "rb") as f:
            os.fsync(f.fileno())

    own_s, synced_s, ours_s = medians(
        [
            lambda i: own.save_checkpoint(checkpoint, workdir / f"l-{i}.ckpt"),
            synced,
            lambda i: ours.save_checkpoint(checkpoint, workdir / "last.ckpt"),
        ],
        repeats,
    )
    return own_s, synced_s, ours_s


def transformers_trainer(mib: float, repeats: int, workdir: Path) -> tuple[float, float, float]:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from torchkeep.integrations import _seal
    from torchkeep.integrations.transformers import TorchkeepTrainer

    layers = max(1, round(mib / 12))  # one GPT-2 block of width 512 is about 12 MiB
    config = GPT2Config(n_layer=layers, n_head=8, n_embd=512, vocab_size=1024, n_positions=64)
    ids = torch.randint(0, 1024, (16, 32))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(workdir / "hf"), max_steps=2, per_device_train_batch_size=4,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = TorchkeepTrainer(model=GPT2LMHeadModel(config), args=args, train_dataset=data)
    trainer.train()
    steps = iter(range(100, 10**6))

    def save(own: bool) -> Callable[[int], None]:
        def run(_: int) -> None:
            trainer.state.global_step = next(steps)
            method = Trainer._save_checkpoint if own else TorchkeepTrainer._save_checkpoint
            method(trainer, trainer.model, None)

        return run

    own_s, ours_s = medians([save(own=True), save(own=False)], repeats)
    own_folder = next(p for p in (workdir / "hf").iterdir() if (p / "optimizer.pt").exists())
    (seal_s,) = medians([lambda _: _seal.seal(own_folder)], repeats)
    return own_s, ours_s, seal_s


def accelerate(mib: float, repeats: int, workdir: Path) -> tuple[float, float]:
    from accelerate import Accelerator

    from torchkeep.integrations.accelerate import save_state

    accelerator = Accelerator(cpu=True)
    model = _mlp(mib)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = accelerator.prepare(model, opt)
    accelerator.backward(model(torch.randn(4, 1024)).square().mean())
    opt.step()
    own_s, ours_s = medians(
        [
            lambda i: accelerator.save_state(str(workdir / f"acc-{i}")),
            lambda i: save_state(accelerator, workdir / "tk", i + 1, model=model, optimizer=opt),
        ],
        repeats,
    )
    return own_s, ours_s


def main(argv: list[str] | None = None) -> None:
    """Measure save time per checkpoint for Lightning, the HF Trainer and Accelerate."""
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=64.0, help="weights per model, MiB")
    args = parser.parse_args(argv)
    mib = 8.0 if args.quick else args.mib
    workdir = Path(tempfile.mkdtemp(prefix="bench-integrations-", dir=args.dir))
    print(f"weights about {mib:g} MiB per model (+ AdamW state, twice that); median of "
          f"{args.repeat} saves, seconds")  # fmt: skip
    try:
        own, synced, ours = lightning(mib, args.repeat, workdir)
        print(f"Lightning   TorchCheckpointIO {own:.3f} (+fsync {synced:.3f})  "
              f"TorchkeepCheckpointIO {ours:.3f}  ({ours / own:.2f}x)")  # fmt: skip
        own, ours, seal = transformers_trainer(mib, args.repeat, workdir)
        print(f"HF Trainer  Trainer {own:.3f}  TorchkeepTrainer {ours:.3f}  ({ours / own:.2f}x);"
              f"  TorchkeepSealCallback adds {seal:.3f}")  # fmt: skip
        own, ours = accelerate(mib, args.repeat, workdir)
        print(f"Accelerate  accelerator.save_state {own:.3f}  torchkeep save_state {ours:.3f}  "
              f"({ours / own:.2f}x)")  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
