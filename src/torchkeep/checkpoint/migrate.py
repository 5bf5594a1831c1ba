"""To and from the tutorial's ``torch.save`` checkpoint dict.

The tutorial saves ``{"epoch", "model_state_dict", "optimizer_state_dict", "loss"}`` with
``torch.save``. :func:`import_torch_checkpoint` reads such a file with weights-only semantics
(nothing in it is executed) and commits it as a torchkeep step; :func:`export_torch_checkpoint`
writes a step back in that shape for tools that read only it.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import FileFormatError
from ..formats import torch_zip
from ..storage.local import atomic_file
from ..weights import MODEL_KEYS
from .layout import MAX_STEP, RNG_ENTRY
from .reader import LoadedStep

OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optim")
SCHEDULER_KEYS = ("scheduler_state_dict", "lr_scheduler", "scheduler")
SCALER_KEYS = ("scaler_state_dict", "scaler")


class _StateDict:
    """Lends a loaded state dict the ``state_dict()`` of the object it came from."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self._state = dict(state)

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        self._state = state_dict


def _pop_first(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if isinstance(data.get(key), Mapping):
            return data.pop(key)
    return None


def _number(value: object) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _step_number(counter: object) -> int:
    """The dict's ``epoch``/``step`` as a step number; 0 when it cannot be one (not an int,
    negative, past :data:`MAX_STEP`): the file's values must not make the import fail."""
    if isinstance(counter, int) and not isinstance(counter, bool) and 0 <= counter <= MAX_STEP:
        return counter
    return 0


def import_torch_checkpoint(
    src: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    step: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Commit a tutorial-style ``torch.save`` checkpoint dict as a torchkeep step.

    The file is read with torch's weights-only unpickler: a file that names any Python object
    beyond tensors and containers is refused, and nothing in it is run. ``model_state_dict``
    (or ``state_dict``, ``model``, ...) becomes the ``model`` entry, ``optimizer_state_dict``
    the ``optimizer`` entry (its parameter ids follow the model's parameter order, exactly as
    ``torch.optim`` expects on load), ``loss`` a metric, and every other key a plain value of
    the same name (any name: ``step``, ``metrics``, ``overwrite``); a key that names a state
    part already taken (``"model": "resnet50"`` beside ``model_state_dict``) is stored as
    ``model_value``.

    Args:
        src: the ``.pt``/``.pth``/``.tar`` file.
        directory: the checkpoint folder to add the step to (created if missing).
        step: the step number; default the dict's ``epoch`` (or ``step``), else 0.
        overwrite: replace an existing step of that number.

    Returns:
        The committed step directory.

    Raises:
        UnsafeCheckpointError: the file refers to code.
        UnsupportedValueError: a value cannot be stored without pickle (named by its path).
        FileFormatError: the file holds no checkpoint dict with a model state dict.

    Example:
        >>> import_torch_checkpoint("old.pt", "ckpt")
        PosixPath('ckpt/step-00000005')
    """
    from .manager import CheckpointManager

    path = Path(src)
    data = torch_zip.load(path, map_location="cpu")
    if not isinstance(data, Mapping):
        raise FileFormatError(f"{path} holds a {type(data).__name__}, not a checkpoint dict")
    data = dict(data)
    model = _pop_first(data, MODEL_KEYS)
    if model is None:
        raise FileFormatError(
            f"{path} has no model state dict (looked for {', '.join(MODEL_KEYS)}); keys are "
            f"{', '.join(repr(k) for k in list(data)[:10])}"
        )
    states = {
        "model": model,
        "optimizer": _pop_first(data, OPTIMIZER_KEYS),
        "scheduler": _pop_first(data, SCHEDULER_KEYS),
        "scaler": _pop_first(data, SCALER_KEYS),
    }
    metrics = {}
    loss = _number(data.get("loss"))
    if loss is not None:
        metrics["loss"] = loss
    if step is None:
        counter = data.get("epoch", data.get("step", 0))
        step = _step_number(counter)
    wrapped = {name: _StateDict(state) for name, state in states.items() if state is not None}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        extra[_free_name(str(key), taken=set(wrapped) | set(extra))] = value
    manager = CheckpointManager(directory, keep_last=None, save_rng=False)
    return manager._save_entries(step, wrapped, extra, metrics=metrics, overwrite=overwrite)


def _free_name(key: str, *, taken: set[str]) -> str:
    """``key``, or ``key_value`` (``key_value_value``...) when a state part already uses it."""
    name = key
    while name in taken:
        name = f"{name}_value"
    return name


def export_torch_checkpoint(loaded: LoadedStep, path: Path) -> Path:
    """Write ``loaded`` as a tutorial-style dict with ``torch.save`` (atomically).

    ``model_state_dict``, ``optimizer_state_dict`` (and ``scheduler_state_dict``,
    ``scaler_state_dict`` when saved), ``epoch`` (the saved ``epoch`` value, else the step),
    ``loss`` (the saved metric or value) and the other plain values. The result loads with
    ``torch.load(path, weights_only=True)``.
    """
    values = {name: value for name, (kind, value) in loaded.entries.items() if kind == "value"}
    states = {name: value for name, (kind, value) in loaded.entries.items() if kind == "stateful"}
    values.pop(RNG_ENTRY, None)
    result: dict[str, Any] = {"epoch": values.pop("epoch", loaded.step)}
    for name in ("model", "optimizer", "scheduler", "scaler"):
        if name in states:
            result[f"{name}_state_dict"] = states.pop(name)
    loss = values.pop("loss", None)
    loss = loaded.metrics.get("loss") if loss is None else loss
    if loss is not None:
        result["loss"] = loss
    result.update({f"{name}_state_dict": state for name, state in states.items()})
    result.update(values)
    result["step"] = loaded.step
    with atomic_file(path) as f:
        torch.save(result, f)
    return path
