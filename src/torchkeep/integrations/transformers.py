"""Hugging Face ``Trainer`` checkpoints that a crash cannot tear, at two levels.

Level 1, public API only: :class:`TorchkeepSealCallback` seals every ``checkpoint-N`` folder
the ``Trainer`` writes (every file fsynced, then a manifest with their sizes and hashes written
last), and :func:`last_valid_checkpoint` returns the newest folder that verifies, for
``trainer.train(resume_from_checkpoint=...)``. Transformers' own ``get_last_checkpoint``
picks the newest folder by name without checking it is complete.

Level 2, full takeover: :class:`TorchkeepTrainer` (or :class:`TorchkeepTrainerMixin` in front
of another ``Trainer`` subclass, such as TRL's) writes each ``checkpoint-N`` as one atomic
torchkeep step (model, optimizer, scheduler, scaler, random generators as safetensors and
JSON, plus ``trainer_state.json``) and resumes from it bit-identically: no pickle is written or
read. It overrides private ``Trainer`` methods, so it runs only on the tested transformers
versions (:data:`TESTED_VERSIONS`), single-process, without DeepSpeed or FSDP.

The ``Trainer`` writes ``output_dir`` as a local folder: given ``s3://bucket/run`` it makes
the local folder ``s3:/bucket/run`` and its checkpoints never reach the bucket. Every entry
point here refuses a URL (:class:`~torchkeep.StorageCapabilityError`, naming it) instead:
train into a local ``output_dir`` and copy the checkpoints you keep to the bucket
(``tk.CheckpointManager("s3://...")`` or ``push_to_hub``).

Needs ``pip install 'torchkeep[transformers]'``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from ..checkpoint import rng
from ..errors import IntegrationError, TorchkeepFileNotFoundError
from ..manifest import MANIFEST_NAME, declared_format
from ..verify import verify
from . import _seal, _steps
from ._location import Location, local_path
from ._require import require

require("transformers", extra="transformers", feature="torchkeep.integrations.transformers")

from transformers import Trainer, TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints  # noqa: E402

__all__ = [
    "TESTED_VERSIONS",
    "TorchkeepSealCallback",
    "TorchkeepTrainer",
    "TorchkeepTrainerMixin",
    "checkpoint_problems",
    "last_valid_checkpoint",
]

# The transformers versions (major, minor) whose private Trainer methods the takeover was
# tested against: [first, last] inclusive.
TESTED_VERSIONS = ((5, 24), (5, 24))
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_DIR = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-([0-9]+)")


def _local(location: Location, feature: str) -> Path:
    """``location`` as a local path; a URL is refused (the ``Trainer`` writes local folders)."""
    return local_path(
        location,
        feature=feature,
        fix="the Hugging Face Trainer writes output_dir as a local folder; train into a local "
        "output_dir and copy the checkpoints to the bucket (tk.CheckpointManager('s3://...') "
        "or push_to_hub)",
    )


class TorchkeepSealCallback(TrainerCallback):
    """Seals each ``checkpoint-N`` folder right after the ``Trainer`` wrote it.

    Add it with ``Trainer(..., callbacks=[TorchkeepSealCallback()])`` and resume with
    ``trainer.train(resume_from_checkpoint=last_valid_checkpoint(args.output_dir))``. The files
    stay the ``Trainer``'s own (its pickles included, which it loads with
    ``weights_only=True``); keep ``save_total_limit >= 2``, as the ``Trainer`` deletes old
    folders before this callback runs.
    """

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Refuse a URL ``output_dir`` before training starts (the ``Trainer`` would write
        a local folder named ``s3:``)."""
        _local(args.output_dir, "TorchkeepSealCallback")
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Seal the folder of ``state.global_step`` (on the main process, after every
        process has written its files)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if state.is_world_process_zero:
            output_dir = _local(args.output_dir, "TorchkeepSealCallback")
            folder = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                _seal.seal(folder)
            else:
                warnings.warn(f"{folder} was not found, so it was not sealed", stacklevel=2)
        return control


def checkpoint_problems(folder: str | os.PathLike[str]) -> list[str]:
    """Why ``folder`` cannot be resumed from (empty when it is a complete checkpoint).

    A folder sealed by :class:`TorchkeepSealCallback` and a step written by
    :class:`TorchkeepTrainer` are checked against their manifests (every file's size and hash);
    anything else counts as incomplete.

    Raises:
        StorageCapabilityError: ``folder`` is a URL.
    """
    path = _local(folder, "checkpoint_problems")
    if path.is_symlink():
        return [f"{path} is a link; a checkpoint folder must be a real folder of the output dir"]
    kind = declared_format(path)
    if kind == _seal.KIND:
        return _seal.problems(path)
    if kind is None:
        return [f"{path} has no torchkeep {MANIFEST_NAME}: it was never sealed (torn or unsealed)"]
    return verify(path).problems


def last_valid_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that verifies whole, or None.

    Newer folders that do not verify are skipped with a warning naming the problem.

    Raises:
        StorageCapabilityError: ``output_dir`` is a URL.

    Example:
        >>> trainer.train(resume_from_checkpoint=last_valid_checkpoint(args.output_dir))
    """
    root = _local(output_dir, "last_valid_checkpoint")
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_DIR.fullmatch(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    for _, folder in sorted(found, reverse=True):
        problems = checkpoint_problems(folder)
        if not problems:
            return str(folder)
        warnings.warn(f"{folder} is incomplete and was skipped: {problems[0]}", stacklevel=2)
    return None


def _version_problem() -> str | None:
    # Looked up at call time: transformers replaces its module object in sys.modules as its
    # lazy attributes load, so a reference taken at import can go stale.
    installed = str(getattr(sys.modules.get("transformers"), "__version__", "0.0"))
    parts = re.match(r"(\d+)\.(\d+)", installed)
    version = (int(parts.group(1)), int(parts.group(2))) if parts else (0, 0)
    first, last = TESTED_VERSIONS
    if first <= version <= last:
        return None
    shown = ".".join(map(str, first)) + " to " + ".".join(map(str, last))
    return (
        f"TorchkeepTrainer overrides private Trainer methods and was tested with transformers "
        f"{shown}, not {installed}"
    )


class TorchkeepTrainerMixin:
    """Makes a ``Trainer`` subclass write and resume torchkeep steps (put it first in the bases).

    Args:
        allow_untested_transformers: run on a transformers version outside
            :data:`TESTED_VERSIONS` with a warning instead of an error.

    Raises:
        IntegrationError: (at construction) an untested transformers version, DeepSpeed, FSDP
            or more than one process; use :class:`TorchkeepSealCallback` there.
        StorageCapabilityError: (at construction, before the ``Trainer`` makes its folder)
            ``args.output_dir`` is a URL.

    Example:
        >>> class MySFTTrainer(TorchkeepTrainerMixin, SFTTrainer): ...
    """

    def __init__(self, *args: Any, allow_untested_transformers: bool = False, **kwargs: Any):
        problem = _version_problem()
        if problem is not None:
            fix = "use TorchkeepSealCallback (public API only) with this version"
            if not allow_untested_transformers:
                raise IntegrationError(
                    f"{problem}; {fix}, or pass allow_untested_transformers=True"
                )
            warnings.warn(f"{problem}; resume may break ({fix})", stacklevel=2)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        output_dir = getattr(training_args, "output_dir", None)
        if output_dir is not None:
            _local(output_dir, "TorchkeepTrainer")
        super().__init__(*args, **kwargs)
        trainer: Any = self
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or trainer.args.world_size > 1:
            raise IntegrationError(
                "TorchkeepTrainer writes single-process checkpoints; with DeepSpeed, FSDP or "
                "several processes use Trainer with TorchkeepSealCallback instead"
            )
        self._torchkeep_cache: tuple[str, dict[str, Any], dict[str, Any] | None] | None = None

    # ---- saving -------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        trainer: Any = self
        if trainer.hp_search_backend is None and trial is None:
            trainer.store_flos()
        run_dir = trainer._get_output_dir(trial=trial)
        run = _local(run_dir, "TorchkeepTrainer")
        output_dir = run / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        if trainer.state.best_global_step:
            best = run / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.best_global_step}"
            if best.exists() or best == output_dir:
                trainer.state.best_model_checkpoint = str(best)
        values: dict[str, Any] = {"model": trainer.accelerator.unwrap_model(trainer.model)}
        if not trainer.args.save_only_model:
            values["optimizer"] = trainer.optimizer
            values["scheduler"] = trainer.lr_scheduler
            scaler = getattr(trainer.accelerator, "scaler", None)
            if scaler is not None:
                values["scaler"] = scaler
        self._record_callback_states()
        state = json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True) + "\n"
        if trainer.args.should_save:
            _steps.save_values(
                output_dir,
                values,
                step=trainer.state.global_step,
                capture_rng=not trainer.args.save_only_model,
                extra_files={TRAINER_STATE_NAME: state.encode()},
            )
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=trainer.args.save_total_limit,
                best_model_checkpoint=trainer.state.best_model_checkpoint,
                use_mtime=False,
            )

    def _record_callback_states(self) -> None:
        """What ``Trainer._save_checkpoint`` does for ``ExportableState`` callbacks."""
        from transformers.trainer_callback import ExportableState

        trainer: Any = self
        exportable = [*trainer.callback_handler.callbacks, trainer.control]
        for callback in [cb for cb in exportable if isinstance(cb, ExportableState)]:
            name = callback.__class__.__name__
            if isinstance(trainer.state.stateful_callbacks.get(name), list):
                trainer.state.stateful_callbacks[name].append(callback.state())
            else:
                trainer.state.stateful_callbacks[name] = callback.state()

    # ---- resuming -----------------------------------------------------------------------------

    def _torchkeep_step(self, checkpoint: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The verified step at ``checkpoint``, read once per resume."""
        path = _local(checkpoint, "TorchkeepTrainer")
        key = os.path.realpath(path)
        if self._torchkeep_cache is None or self._torchkeep_cache[0] != key:
            try:
                values, states = _steps.load_values(path)
            except TorchkeepFileNotFoundError:
                raise IntegrationError(
                    f"{checkpoint} is not a torchkeep step (no manifest: written by the plain "
                    "Trainer, or torn); resume it with the plain Trainer, or pick another "
                    "with last_valid_checkpoint()"
                ) from None
            self._torchkeep_cache = (key, values, states)
        return self._torchkeep_cache[1], self._torchkeep_cache[2]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        trainer: Any = self
        values, _ = self._torchkeep_step(resume_from_checkpoint)
        (model if model is not None else trainer.model).load_state_dict(values["model"])

    def _load_best_model(self) -> None:
        trainer: Any = self
        self._load_from_checkpoint(trainer.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        trainer: Any = self
        values, _ = self._torchkeep_step(checkpoint)
        if "optimizer" not in values:
            raise IntegrationError(
                f"{checkpoint} holds no optimizer state (saved with save_only_model=True); "
                "it cannot be resumed from"
            )
        trainer.optimizer.load_state_dict(values["optimizer"])
        trainer.lr_scheduler.load_state_dict(values["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        trainer: Any = self
        values, _ = self._torchkeep_step(checkpoint)
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None and "scaler" in values:
            scaler.load_state_dict(values["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        _, states = self._torchkeep_step(checkpoint)
        if states is not None:
            rng.restore(states)
        self._torchkeep_cache = None  # the last of the resume's reads: free the copies


class TorchkeepTrainer(TorchkeepTrainerMixin, Trainer):
    """A ``Trainer`` whose checkpoints are atomic, hashed, pickle-free torchkeep steps.

    Example:
        >>> trainer = TorchkeepTrainer(model=model, args=args, train_dataset=data)
        >>> trainer.train(resume_from_checkpoint=True)
    """
