"""Workers for tests/test_integrations_lightning_sharded.py (run through tests/_dist_harness.py).

Each rank joins a gloo group over a ``file://`` rendezvous, then runs a real Lightning
``Trainer`` with ``TorchkeepModelParallelStrategy`` (FSDP2 over a CPU mesh): Lightning sees
``LOCAL_RANK`` and an initialised group, so it launches nothing itself.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests._dist_workers import init


def _net(hidden: int) -> Any:
    import lightning as L
    from torch.distributed.fsdp import fully_shard

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"hidden": hidden, "lr": 0.05})
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1)
            )
            self.steps_run = 0

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            self.steps_run += 1
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=0.05)
            sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
            return {"optimizer": opt, "lr_scheduler": sched}

    return Net()


def _fit(out: Path, run: str, epochs: int, resume: bool, hidden: int) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from torchkeep.integrations.lightning import TorchkeepModelParallelStrategy

    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16, shuffle=True
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=2,
        strategy=TorchkeepModelParallelStrategy(),
        callbacks=[ModelCheckpoint(dirpath=out / f"ckpt-{run}", save_last=True, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = _net(hidden)
    trainer.fit(model, loader, ckpt_path="last" if resume else None)
    full = get_model_state_dict(
        trainer.strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(out / f"final-{run}.st"))
    return {"steps_run": model.steps_run, "global_step": trainer.global_step, "trainer": trainer}


def fit(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run each of ``ctx["runs"]`` (name, epochs, resume) in turn; per run, the training steps
    this process ran and the trainer's final global step."""
    os.environ.update(
        LOCAL_RANK=str(rank), NODE_RANK="0", RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT="1",  # unused: the group exists already
    )  # fmt: skip
    warnings.filterwarnings("ignore")
    init(rank, world, ctx)
    out = Path(ctx["out"])
    report: dict[str, Any] = {}
    for run, epochs, resume in ctx["runs"]:
        done = _fit(out, run, epochs, resume, ctx.get("hidden", 32))
        done.pop("trainer")
        report[run] = done
    return report


def save_times(rank: int, world: int, ctx: dict[str, Any]) -> dict[str, list[float]]:
    """Train one epoch, then save the same checkpoint dict with Lightning's own
    ``ModelParallelStrategy.save_checkpoint`` and with torchkeep's, ``ctx["repeat"]`` times
    each, interleaved; the seconds each save took on this rank."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    os.environ.update(
        LOCAL_RANK=str(rank), NODE_RANK="0", RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
    )  # fmt: skip
    warnings.filterwarnings("ignore")
    init(rank, world, ctx)
    out = Path(ctx["out"])
    trainer = _fit(out, "bench", 1, False, ctx["hidden"])["trainer"]
    strategy = trainer.strategy
    times: dict[str, list[float]] = {"lightning": [], "torchkeep": []}
    for i in range(ctx["repeat"]):
        for kind in ("lightning", "torchkeep"):
            checkpoint = trainer._checkpoint_connector.dump_checkpoint()
            dist.barrier()
            start = time.perf_counter()
            if kind == "lightning":
                ModelParallelStrategy.save_checkpoint(strategy, checkpoint, out / f"l-{i}.ckpt")
            else:
                strategy.save_checkpoint(checkpoint, out / f"tk-{i}.ckpt")
            dist.barrier()
            times[kind].append(time.perf_counter() - start)
    return times
