"""Hugging Face Trainer: the seal callback with last_valid_checkpoint, and the takeover trainer.

A tiny GPT-2 (2 layers, 32 wide) trains 20 steps on the CPU, saving every 10. Resumes run in
fresh processes (this file is also the worker: ``python tests/test_integrations_hf.py MODE OUT``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

import torchkeep as tk
from tests._source import SRC
from torchkeep.integrations.transformers import (
    TorchkeepSealCallback,
    TorchkeepTrainer,
    last_valid_checkpoint,
)

# transformers 5 disables its torch models under torch < 2.6 (tests/_compat.py)
pytestmark = pytest.mark.usefixtures("transformers_models")


class TokenData(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.ids = torch.randint(0, 128, (64, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAfterTen(TrainerCallback):  # type: ignore[misc]
    """Stands in for a crash right after the checkpoint of step 10."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == 10:
            control.should_training_stop = True
        return control


def make_trainer(out: Path, *, takeover: bool, callbacks: list[Any]) -> Any:
    set_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=32)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=20,
        save_strategy="steps",
        save_steps=10,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_total_limit=3,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    cls = TorchkeepTrainer if takeover else Trainer
    return cls(
        model=GPT2LMHeadModel(config), args=args, train_dataset=TokenData(), callbacks=callbacks
    )


def _worker(mode: str, out: Path) -> None:
    warnings.filterwarnings("ignore")
    if mode == "first":  # the straight run (sealed) and the takeover run that stops at 10
        trainer = make_trainer(out / "seal", takeover=False, callbacks=[TorchkeepSealCallback()])
        trainer.train()
        tk.save_weights(trainer.model, out / "final-straight.safetensors")
        make_trainer(out / "takeover", takeover=True, callbacks=[StopAfterTen()]).train()
    elif mode == "seal-resume":
        trainer = make_trainer(out / "seal", takeover=False, callbacks=[TorchkeepSealCallback()])
        trainer.train(resume_from_checkpoint=last_valid_checkpoint(out / "seal"))
        tk.save_weights(trainer.model, out / "final-seal-resume.safetensors")
    elif mode == "takeover-resume":
        trainer = make_trainer(out / "takeover", takeover=True, callbacks=[])
        trainer.train(resume_from_checkpoint=True)
        tk.save_weights(trainer.model, out / "final-takeover-resume.safetensors")


def _run_worker(mode: str, out: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        # the worker imports tests._source too: the repo root goes after the code under test
        "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).resolve().parents[1])]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    proc = subprocess.run(
        [sys.executable, __file__, mode, str(out)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    _run_worker("first", out)
    return out


def _assert_same_weights(out: Path, name: str) -> None:
    straight = tk.load_state_dict(out / "final-straight.safetensors")
    resumed = tk.load_state_dict(out / f"final-{name}.safetensors")
    assert sorted(straight) == sorted(resumed)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_a_torn_newest_checkpoint_falls_back_and_resumes_bit_identically(runs: Path) -> None:
    folder = runs / "seal"
    assert last_valid_checkpoint(folder) == str(folder / "checkpoint-20")
    victim = folder / "checkpoint-20" / "optimizer.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a torn write
    assert get_last_checkpoint(str(folder)) == str(folder / "checkpoint-20")  # HF picks it
    with pytest.warns(UserWarning, match=r"checkpoint-20 is incomplete"):
        assert last_valid_checkpoint(folder) == str(folder / "checkpoint-10")
    _run_worker("seal-resume", runs)
    _assert_same_weights(runs, "seal-resume")
    assert last_valid_checkpoint(folder) == str(folder / "checkpoint-20")  # re-sealed whole


def test_an_unsealed_or_grown_folder_is_not_valid(tmp_path: Path) -> None:
    from torchkeep.integrations import _seal

    folder = tmp_path / "checkpoint-5"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 10)
    (folder / "sub" / "b.json").write_text("{}")
    with pytest.warns(UserWarning, match="never sealed"):
        assert last_valid_checkpoint(tmp_path) is None
    _seal.seal(folder)
    assert last_valid_checkpoint(tmp_path) == str(folder)
    (folder / "sub" / "b.json").write_text("{} ")
    with pytest.warns(UserWarning, match="b.json"):
        assert last_valid_checkpoint(tmp_path) is None
    _seal.seal(folder)
    (folder / "late.txt").write_text("added after the seal")
    with pytest.warns(UserWarning, match="late.txt"):
        assert last_valid_checkpoint(tmp_path) is None


def test_the_takeover_trainer_writes_no_pickle_and_resumes_bit_identically(runs: Path) -> None:
    folder = runs / "takeover"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-10"]
    _run_worker("takeover-resume", runs)
    _assert_same_weights(runs, "takeover-resume")
    for step in ("checkpoint-10", "checkpoint-20"):
        files = sorted(p.name for p in (folder / step).iterdir())
        assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl"))], files
        assert "trainer_state.json" in files
        assert tk.verify(folder / step).ok
        assert last_valid_checkpoint(folder) == str(folder / "checkpoint-20")


def test_the_takeover_trainer_loads_the_best_model_at_the_end_from_its_step(
    tmp_path: Path,
) -> None:
    set_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=128, n_positions=32)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worst loss: an early checkpoint, not the final weights
        save_total_limit=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    data = TokenData()
    trainer = TorchkeepTrainer(
        model=GPT2LMHeadModel(config), args=args, train_dataset=data, eval_dataset=data
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == tmp_path
    assert best.name != "checkpoint-6"
    assert tk.verify(best).ok
    saved = tk.load_state_dict(best / "model.safetensors")
    for key, value in saved.items():
        assert torch.equal(trainer.model.state_dict()[key], value), key


def test_the_takeover_trainer_refuses_an_untested_transformers_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.40.0")
    with pytest.raises(tk.IntegrationError, match=r"5\.24 to 5\.24, not 4\.40\.0"):
        make_trainer(tmp_path, takeover=True, callbacks=[])
    with pytest.warns(UserWarning, match="resume may break"):
        TorchkeepTrainer(
            model=torch.nn.Linear(2, 2),
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
            allow_untested_transformers=True,
        )


def test_without_transformers_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "torchkeep.integrations.transformers")
    with pytest.raises(tk.MissingDependencyError, match=r"torchkeep\[transformers\]"):
        import torchkeep.integrations.transformers  # noqa: F401


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
