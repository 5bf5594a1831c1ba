"""Write one golden set: an artifact of every format torchkeep writes, and what each must hold.

Run once per torch version whose files the suite keeps (kept to show how the sets were made):

    PYTHONPATH=src python tests/golden/make_golden.py

writes ``tests/golden/format-v1-torch-<torch version>/`` (refusing to replace an existing one):

- ``weights.safetensors`` and ``weights.pt``: :func:`GoldenNet`'s state plus a tied name and
  tensors of other dtypes and shapes (bfloat16, int8, bool, 0-dim, empty);
- ``net.bundle`` (no program) and ``program.bundle`` (with ``program.pt2``);
- ``ckpt/step-00000003``: model, Adam, StepLR, a CPU ``GradScaler``, the generators, an epoch
  and a metric;
- ``net.onnx`` with its stored verification report;
- ``expected.json``: dtype, shape and SHA-256 of every tensor each artifact holds, the outputs
  on :data:`INPUT`, the scheduler and scaler states, and what the generators give right after
  a resume. ``tests/test_golden.py`` loads every artifact of every set and checks all of it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.golden.model import INPUT, GoldenNet, optimizer_tensors, records  # noqa: E402

import torchkeep as tk  # noqa: E402

STEP = 3


def weights_state(model: GoldenNet) -> dict[str, torch.Tensor]:
    """The model's state plus a tied name and tensors of other dtypes and shapes."""
    gen = torch.Generator().manual_seed(1)
    return {
        **model.state_dict(),
        "head.weight": model.fc2.weight,  # tied to fc2.weight: stored once, restored tied
        "extra.bfloat16": torch.randn(3, 2, generator=gen).to(torch.bfloat16),
        "extra.int8": torch.arange(-4, 4, dtype=torch.int8),
        "extra.bool": torch.tensor([True, False, True]),
        "extra.scalar": torch.tensor(2.5, dtype=torch.float64),
        "extra.empty": torch.zeros(0, 3),
    }


def train(model: GoldenNet) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """A few Adam steps (so the optimizer, scheduler and batch-norm statistics hold state)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    model.train()
    for _ in range(STEP):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 3)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    return optimizer, scheduler, scaler


def main() -> None:
    out = ROOT / "tests" / "golden" / f"format-v1-torch-{torch.__version__.split('+')[0]}"
    out.mkdir()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = GoldenNet(width=4)
    optimizer, scheduler, scaler = train(model)
    inputs = torch.tensor(INPUT)
    with torch.no_grad():
        outputs = model(inputs)

    weights = weights_state(model)
    tk.save_weights(weights, out / "weights.safetensors")
    tk.save_weights(weights, out / "weights.pt")
    tk.save_model(model, out / "net.bundle")
    tk.save_model(model, out / "program.bundle", example_inputs=inputs)
    report = tk.export_onnx(model, inputs, out / "net.onnx")

    mgr = tk.CheckpointManager(out / "ckpt", keep_last=None)
    mgr.save(
        STEP,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        metrics={"loss": 0.25},
        epoch=1,
    )
    after_resume = {
        "torch": torch.rand(4).tolist(),
        "python": random.random(),
        "numpy": float(np.random.rand()),
    }

    import onnx
    from onnx import numpy_helper

    initializers = {
        init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in onnx.load(str(out / "net.onnx")).graph.initializer
    }
    expected = {
        "torch_version": torch.__version__,
        "torchkeep_version": tk.__version__,
        "outputs": outputs.tolist(),
        "weights": records(weights),
        "tied": {"head.weight": "fc2.weight"},
        "model": records(model.state_dict()),
        "optimizer": records(optimizer_tensors(optimizer)),
        "optimizer_groups": optimizer.state_dict()["param_groups"],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": STEP,
        "epoch": 1,
        "metrics": {"loss": 0.25},
        "after_resume": after_resume,
        "onnx": {
            "exporter": report.exporter,
            "opset": report.opset,
            "verified_batch_sizes": list(report.batch_sizes),
            "initializers": records(initializers),
        },
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} with torch {torch.__version__}, torchkeep {tk.__version__}")


if __name__ == "__main__":
    main()
