"""Lightning checkpoints as torchkeep steps: ``Trainer(plugins=[TorchkeepCheckpointIO()])``.

Every path Lightning chooses (``epoch=3-step=32.ckpt``, ``last.ckpt``) becomes a step directory:
one safetensors file and one JSON skeleton per top-level key of Lightning's checkpoint dict,
and a manifest with the size and hash of every file, written last; re-saving ``last.ckpt``
swaps the complete new step in atomically. ``ckpt_path="last"`` keeps working (Lightning finds
``last*.ckpt`` names, directories included). Loading verifies every byte and never unpickles,
whatever ``weights_only`` says. The random generators, which Lightning does not keep, are
captured with every save and restored on load, so a resumed run is bit-identical to an
uninterrupted one.

Needs ``pip install 'torchkeep[lightning]'``. Single-process and DDP strategies (the plugin runs
on global rank 0); sharded strategies (FSDP, ``ModelParallelStrategy``) bypass ``CheckpointIO``:
for FSDP2/TP use ``Trainer(strategy=TorchkeepModelParallelStrategy())`` (from
:mod:`torchkeep.integrations.lightning_sharded`, re-exported here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..checkpoint import rng
from ..errors import (
    FileFormatError,
    IntegrationError,
    TorchkeepFileNotFoundError,
    UnsupportedValueError,
)
from . import _hparams, _steps
from ._require import require

require("lightning", extra="lightning", feature="torchkeep.integrations.lightning")

from lightning.fabric.plugins import CheckpointIO  # noqa: E402

if TYPE_CHECKING:
    from .lightning_sharded import TorchkeepModelParallelStrategy

__all__ = [
    "TorchkeepCheckpointIO",
    "TorchkeepModelParallelStrategy",
    "convert_ckpt",
    "load_from_checkpoint",
]

# The keys of Lightning's checkpoint dict that hold the user's hyper-parameters.
HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


def __getattr__(name: str) -> Any:
    """``TorchkeepModelParallelStrategy``, imported on first use (it needs torch.distributed)."""
    if name == "TorchkeepModelParallelStrategy":
        from .lightning_sharded import TorchkeepModelParallelStrategy

        return TorchkeepModelParallelStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def encode_values(checkpoint: dict[Any, Any], policy: Literal["strict", "drop"]) -> dict[str, Any]:
    """Lightning's checkpoint dict by entry name, its hyper-parameters encoded as data.

    Raises:
        UnsupportedValueError: (``"strict"``) a hyper-parameter cannot be stored, named by path.
    """
    values = {str(key): value for key, value in checkpoint.items()}
    for key in HPARAM_KEYS:
        if key in values:
            values[key] = _hparams.encode(values[key], root=key, policy=policy)
    return values


def decode_values(values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`encode_values`: Namespace and dataclass hyper-parameters back."""
    for key in HPARAM_KEYS:
        if key in values:
            values[key] = _hparams.decode(values[key])
    return values


def _device(map_location: object) -> torch.device | None:
    """The device tensors are moved to on load; None keeps them on the CPU."""
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
        return None if device.type == "cpu" else device
    if isinstance(map_location, dict) or callable(map_location) or map_location is None:
        return None  # Lightning's own loaders move the state where it belongs
    raise UnsupportedValueError(
        f"map_location={map_location!r} is not supported; pass a device, a device name or None"
    )


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_to_device(item, device) for item in value)
    return value


class TorchkeepCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that writes atomic, hashed, pickle-free torchkeep steps.

    Args:
        restore_rng: put the random generators back as they were at the save when a
            checkpoint is loaded (needed for a bit-identical resume).
        hparams: ``"strict"`` stores ``argparse.Namespace`` and dataclass hyper-parameters as
            data and refuses any other value that cannot be stored without pickle, naming its
            path, before anything is written; ``"drop"`` leaves such values out with a warning.

    Example:
        >>> trainer = L.Trainer(plugins=[TorchkeepCheckpointIO()],
        ...                     callbacks=[ModelCheckpoint(dirpath="ckpt", save_last=True)])
        >>> trainer.fit(model, ckpt_path="last")
    """

    def __init__(
        self, *, restore_rng: bool = True, hparams: Literal["strict", "drop"] = "strict"
    ) -> None:
        if hparams not in ("strict", "drop"):
            raise ValueError(f"hparams must be 'strict' or 'drop', not {hparams!r}")
        super().__init__()
        self.restore_rng = restore_rng
        self.hparams = hparams

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        """Commit ``checkpoint`` as the step directory ``path`` (replacing one atomically).

        Raises:
            UnsupportedValueError: ``storage_options`` were given, or a value cannot be stored
                without pickle (named by its path); nothing was written.
            StorageFullError: the disk filled up; the previous checkpoint at ``path`` is intact.
        """
        if storage_options is not None:
            raise UnsupportedValueError(
                f"TorchkeepCheckpointIO takes no storage_options (got {storage_options!r}) "
                f"while saving {path}; leave them out"
            )
        self._commit(checkpoint, path, capture_rng=True)

    def _commit(
        self, checkpoint: dict[Any, Any], path: str | os.PathLike[str], *, capture_rng: bool
    ) -> None:
        values = encode_values(checkpoint, self.hparams)
        step = _steps.step_number(values.get("global_step"))
        _steps.save_values(path, values, step=step, capture_rng=capture_rng)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read and verify the step at ``path``; never unpickles, whatever ``weights_only``.

        Restores the random generators saved with it (unless ``restore_rng=False``).

        Raises:
            TorchkeepFileNotFoundError: ``path`` does not exist or holds no committed step.
            FileFormatError: ``path`` is a ``torch.save`` file (convert it with
                :func:`convert_ckpt` first).
            CorruptFileError: a file of the step is damaged (nothing was restored).
        """
        source = Path(path)
        if source.is_file():
            raise FileFormatError(
                f"{source} is a file, not a torchkeep checkpoint step (a checkpoint Lightning "
                "wrote with torch.save?); convert it once with "
                f"torchkeep.integrations.lightning.convert_ckpt({str(source)!r}, 'new.ckpt')"
            )
        if not source.exists():
            raise TorchkeepFileNotFoundError(f"checkpoint {source} does not exist")
        values, states = _steps.load_values(source)
        values = decode_values(values)
        device = _device(map_location)
        if device is not None:
            values = _to_device(values, device)
        if self.restore_rng and states is not None:
            rng.restore(states)
        return values

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove the checkpoint at ``path``: renamed out of sight first, then deleted."""
        _steps.remove_step(path)


def convert_ckpt(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    hparams: Literal["strict", "drop"] = "strict",
) -> Path:
    """Rewrite a ``.ckpt`` Lightning saved with ``torch.save`` as a torchkeep step.

    The file is scanned and read with the weights-only unpickler (nothing in it runs; a file
    that names code is refused). The result loads through :class:`TorchkeepCheckpointIO`
    (``trainer.fit(model, ckpt_path=destination)``); it holds no generator states, as the
    source had none.

    Raises:
        UnsafeCheckpointError: the file refers to code beyond tensors and containers.
        FileFormatError: the file holds no checkpoint dict.
    """
    from ..formats import torch_zip

    data = torch_zip.load(Path(source), map_location="cpu")
    if not isinstance(data, dict):
        raise FileFormatError(f"{source} holds a {type(data).__name__}, not a checkpoint dict")
    TorchkeepCheckpointIO(hparams=hparams)._commit(data, destination, capture_rng=False)
    return Path(destination)


def load_from_checkpoint(
    cls: type[Any],
    path: str | os.PathLike[str],
    *,
    map_location: Any | None = None,
    strict: bool | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint(path)`` for a checkpoint written by the plugin.

    Lightning's own ``load_from_checkpoint`` reads files with ``torch.load``; this reads the
    step (verified, no pickle), then builds the module from its hyper-parameters (``kwargs``
    override them) and loads its weights with Lightning's own logic. The random generators are
    left alone.

    Raises:
        IntegrationError: this Lightning version lacks the loader it builds on.
        TorchkeepFileNotFoundError, CorruptFileError: as
            :meth:`TorchkeepCheckpointIO.load_checkpoint`.

    Example:
        >>> model = load_from_checkpoint(LitNet, "ckpt/best.ckpt")
    """
    try:
        from lightning.pytorch.core.saving import _load_state
    except ImportError:
        raise IntegrationError(
            "this Lightning version has no lightning.pytorch.core.saving._load_state; build the "
            "module yourself and load TorchkeepCheckpointIO().load_checkpoint(path)['state_dict']"
        ) from None
    checkpoint = TorchkeepCheckpointIO(restore_rng=False).load_checkpoint(path, map_location)
    return _load_state(cls, checkpoint, strict=strict, **kwargs)
