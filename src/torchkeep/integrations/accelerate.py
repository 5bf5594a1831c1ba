"""Accelerate training state as torchkeep checkpoints.

:func:`save_state` and :func:`load_state` replace ``accelerator.save_state()`` and
``load_state()`` with a :class:`~torchkeep.CheckpointManager` step (model, optimizer, scheduler,
scaler, random generators, sampler position; atomic, hashed, pickle-free; old steps retired only
after the new one is committed, where Accelerate deletes old folders before it saves).
:func:`use_torchkeep_for_weights` is for code that keeps calling ``accelerator.save_state()``:
the models' weights then go through torchkeep (safetensors written atomically, tied weights
kept tied, read back without executing anything) while Accelerate writes its other files.

:func:`save_state` and :func:`load_state` take a URL (``s3://bucket/run``) as the
``CheckpointManager`` does, with ``storage_options`` and ``transfer``. Accelerate's own
``save_state(output_dir)`` writes local folders only, so the weight hooks refuse a URL
(``tk.StorageCapabilityError``) instead of writing a local folder named ``s3:``.

Needs ``pip install 'torchkeep[accelerate]'``. Single process; several processes need the
distributed checkpoint writer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import CheckpointManager, Restored
from ..errors import IntegrationError
from ..weights import load_weights, save_weights
from ._location import local_path
from ._require import require

if TYPE_CHECKING:
    from ..storage.transfer import Transfer

require("accelerate", extra="accelerate", feature="torchkeep.integrations.accelerate")

from accelerate import Accelerator  # type: ignore[import-untyped]  # noqa: E402

__all__ = ["load_state", "save_state", "use_torchkeep_for_weights"]


class _SamplerPosition:
    """The state of Accelerate's ``SeedableRandomSampler``: its seed and epoch (two ints)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "initial_seed": int(self.sampler.initial_seed)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.epoch = int(state["epoch"])
        self.sampler.initial_seed = int(state["initial_seed"])


def _dataloader_state(dataloader: Any) -> Any:
    """What of ``dataloader`` to keep: its own state when it is stateful, else its seedable
    sampler's seed and epoch, else nothing (its order comes from the restored generators)."""
    if dataloader is None:
        return None
    if getattr(dataloader, "use_stateful_dataloader", False):
        return dataloader
    get_sampler = getattr(dataloader, "get_sampler", None)
    sampler = get_sampler() if callable(get_sampler) else getattr(dataloader, "sampler", None)
    if hasattr(sampler, "initial_seed") and hasattr(sampler, "epoch"):
        return _SamplerPosition(sampler)
    return None


def _check_single_process(accelerator: Accelerator) -> None:
    if accelerator.num_processes > 1:
        raise IntegrationError(
            f"torchkeep's Accelerate helpers save single-process state; this run has "
            f"{accelerator.num_processes} processes. Use accelerator.save_state() with "
            "use_torchkeep_for_weights(accelerator) there"
        )


def _objects(
    accelerator: Accelerator, model: Any, optimizer: Any, scheduler: Any, dataloader: Any
) -> dict[str, Any]:
    objects = {
        "model": accelerator.unwrap_model(model) if model is not None else None,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": accelerator.scaler,
        "dataloader": _dataloader_state(dataloader),
    }
    return {name: obj for name, obj in objects.items() if obj is not None}


def save_state(
    accelerator: Accelerator,
    directory: str | os.PathLike[str],
    step: int,
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    dataloader: Any = None,
    metrics: Mapping[str, Any] | None = None,
    keep_last: int | None = 3,
    storage_options: Mapping[str, Any] | None = None,
    transfer: Transfer | None = None,
    **extra: Any,
) -> Path | str:
    """Save the training state as ``directory/step-<step>/`` (see the module docstring).

    Args:
        accelerator: the ``Accelerator`` the objects were prepared with.
        directory: the checkpoint folder, local or a URL.
        step: the step number.
        model, optimizer, scheduler: the prepared objects (the model is unwrapped).
        dataloader: the prepared training dataloader (its sampler position is kept).
        metrics: numbers recorded in the manifest.
        keep_last: how many steps to keep (older ones are retired after the commit).
        storage_options, transfer: for a URL, as for :class:`~torchkeep.CheckpointManager`.
        **extra: plain values (``epoch=3``), returned in ``Restored.extra``.

    Returns:
        The committed step directory (its URL for a URL).

    Raises:
        IntegrationError: more than one process.
        UnsupportedValueError: a value cannot be stored without pickle (nothing was written).

    Example:
        >>> save_state(accelerator, "ckpt", step, model=model, optimizer=opt, scheduler=sched,
        ...            dataloader=train_dl, epoch=epoch)
    """
    _check_single_process(accelerator)
    objects = _objects(accelerator, model, optimizer, scheduler, dataloader)
    with CheckpointManager(
        directory, keep_last=keep_last, storage_options=storage_options, transfer=transfer
    ) as manager:
        return manager.save(step, metrics=metrics, **objects, **extra)


def load_state(
    accelerator: Accelerator,
    directory: str | os.PathLike[str],
    *,
    step: int | None = None,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    dataloader: Any = None,
    restore_rng: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    transfer: Transfer | None = None,
) -> Restored:
    """Restore the newest valid step (or ``step``) of ``directory`` (local or a URL) into the
    given objects.

    Every file is verified before anything changes; a damaged newest step is skipped with a
    warning. Pass the same objects as to :func:`save_state`.

    Returns:
        The :class:`~torchkeep.Restored` step (``.step``, ``.metrics``, ``.extra``).

    Raises:
        CheckpointNotFoundError: no valid step.
        StateDictMismatchError: an object does not fit its entry; nothing was changed.
    """
    _check_single_process(accelerator)
    objects = _objects(accelerator, model, optimizer, scheduler, dataloader)
    manager = CheckpointManager(
        directory, keep_last=None, storage_options=storage_options, transfer=transfer
    )
    return manager.restore(step, restore_rng=restore_rng, **objects)


def _weights_name(index: int) -> str:
    """Accelerate's own file names, so either side can read the other's folder."""
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


def use_torchkeep_for_weights(accelerator: Accelerator) -> None:
    """Make ``accelerator.save_state()``/``load_state()`` write and read model weights through
    torchkeep; Accelerate keeps writing its other files (optimizer, scheduler, RNG) itself.

    Accelerate writes ``output_dir`` as a local folder, so a URL there is refused
    (:class:`~torchkeep.StorageCapabilityError`) before any weights are written; use
    :func:`save_state` with the URL instead.

    Example:
        >>> use_torchkeep_for_weights(accelerator)
        >>> accelerator.save_state("ckpt")
    """

    def folder(location: str) -> Path:
        return local_path(
            location,
            feature="accelerator.save_state()/load_state()",
            fix="use torchkeep.integrations.accelerate.save_state(accelerator, url, step, ...) "
            "and load_state(), which write and read steps on object storage",
        )

    def save_hook(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        directory = folder(output_dir)
        for index, state in enumerate(weights):
            save_weights(state, directory / _weights_name(index))
        weights.clear()  # Accelerate writes no model file of its own

    def load_hook(models: list[Any], input_dir: str) -> None:
        directory = folder(input_dir)
        for index, model in enumerate(models):
            load_weights(accelerator.unwrap_model(model), directory / _weights_name(index))
        models.clear()  # Accelerate loads none itself

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
