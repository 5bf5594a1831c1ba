"""torch.Generator objects as checkpoint state: a DataLoader's own generator resumes exactly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk

from .conftest import assert_state_equal

EPOCHS, BATCH = 3, 4


def test_a_generator_is_saved_and_set_in_place(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    torch.randn(3, generator=gen)
    expected = torch.randn(5, generator=torch.Generator().set_state(gen.get_state()))
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, loader_gen=gen)
    later = torch.Generator().manual_seed(99)
    restored = mgr.restore(loader_gen=later)
    assert "loader_gen" not in restored.extra
    assert torch.equal(torch.randn(5, generator=later), expected)


def test_restoring_a_generator_of_another_kind_changes_nothing(tmp_path: Path) -> None:
    """A state that does not fit the generator is refused before anything else is loaded."""

    class OtherGenerator:  # the state of a generator of another kind (16 bytes, like CUDA's)
        def state_dict(self) -> dict[str, object]:
            return {"device": torch.device("cpu"), "state": torch.zeros(16, dtype=torch.uint8)}

        def load_state_dict(self, state: object) -> None: ...

    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, model=nn.Linear(2, 2), loader_gen=OtherGenerator())
    model, gen = nn.Linear(2, 2), torch.Generator().manual_seed(3)
    before, gen_before = {k: v.clone() for k, v in model.state_dict().items()}, gen.get_state()
    with pytest.raises(tk.StateDictMismatchError, match=r"loader_gen.*\[16\]"):
        mgr.restore(model=model, loader_gen=gen)
    assert_state_equal(model.state_dict(), before)
    assert torch.equal(gen.get_state(), gen_before)


def test_a_generator_restored_without_its_object_is_a_clear_error(tmp_path: Path) -> None:
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, loader_gen=torch.Generator())
    with pytest.raises(tk.StateDictMismatchError, match="no 'other'"):
        mgr.restore(other=torch.Generator())


def _data() -> TensorDataset:
    torch.manual_seed(1234)
    x = torch.randn(26, 5)
    return TensorDataset(x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(26, 1))


def _train(ckpt: Path, *, stop_after: int | None) -> tuple[list[torch.Tensor], nn.Module]:
    """Train EPOCHS epochs over a shuffled DataLoader with its own generator, saving after every
    batch; stop (as if killed) after ``stop_after`` batches; resume from ``ckpt`` if it holds a
    step. Returns the first input of every batch seen in this run, and the model."""
    data = _data()
    gen = torch.Generator().manual_seed(42)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # The loader's generator as it was when this epoch's iterator was created: restoring it
    # and creating the iterator again draws the same order.
    epoch_start = torch.Generator()
    mgr = tk.CheckpointManager(ckpt, keep_last=2)
    start_epoch, skip = 0, 0
    torch.manual_seed(987)  # a resumed process starts from other global RNG states
    random.seed(987)
    if mgr.latest_step is not None:
        restored = mgr.restore(model=model, optimizer=opt, loader_gen=gen)
        start_epoch, skip = restored.extra["epoch"], restored.extra["batch"]
    seen: list[torch.Tensor] = []
    done = 0
    for epoch in range(start_epoch, EPOCHS):
        epoch_start.set_state(gen.get_state())
        for batch, (x, y) in enumerate(loader):
            if batch < skip:
                continue
            seen.append(x[0].clone())
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            step = epoch * 100 + batch
            mgr.save(step, model=model, optimizer=opt, loader_gen=epoch_start, epoch=epoch,
                     batch=batch + 1)  # fmt: skip
            done += 1
            if stop_after is not None and done == stop_after:
                return seen, model
        skip = 0
    return seen, model


@pytest.mark.parametrize("stop_after", [3, 7, 11])
def test_dataloader_with_its_own_generator_resumes_exactly(tmp_path: Path, stop_after: int) -> None:
    """Interrupted mid-epoch (batch 3 of epoch 0, batch 0 and 4 of epoch 1: 7 batches per
    epoch) and resumed by fresh objects: the same batches in the same order, the same weights
    bit for bit."""
    straight, reference = _train(tmp_path / "straight", stop_after=None)
    first, _ = _train(tmp_path / "resumed", stop_after=stop_after)
    second, resumed = _train(tmp_path / "resumed", stop_after=None)
    assert len(first) + len(second) == len(straight)
    for a, b in zip(first + second, straight, strict=True):
        assert torch.equal(a, b)
    assert_state_equal(resumed.state_dict(), reference.state_dict())


def test_the_resume_depends_on_the_saved_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the generator not restored, the resumed run sees other batches: the test above
    can fail."""
    straight, _ = _train(tmp_path / "straight", stop_after=None)
    first, _ = _train(tmp_path / "resumed", stop_after=11)  # in epoch 1
    monkeypatch.setattr(tk.checkpoint.entries.GeneratorState, "load_state_dict", lambda s, st: None)
    second, _ = _train(tmp_path / "resumed", stop_after=None)
    assert not all(torch.equal(a, b) for a, b in zip(first + second, straight, strict=True))
