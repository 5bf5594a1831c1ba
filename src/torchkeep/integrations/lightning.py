"""Lightning checkpoints as torchkeep steps: ``Trainer(plugins=[TorchkeepCheckpointIO()])``.

Every path Lightning chooses (``epoch=3-step=32.ckpt``, ``last.ckpt``) becomes a step directory:
one safetensors file and one JSON skeleton per top-level key of Lightning's checkpoint dict,
and a manifest with the size and hash of every file, written last; re-saving ``last.ckpt``
swaps the complete new step in atomically. ``ckpt_path="last"`` keeps working (Lightning finds
``last*.ckpt`` names, directories included). Loading verifies every byte and never unpickles,
whatever ``weights_only`` says. The random generators, which Lightning does not keep, are
captured with every save and restored on load, so a resumed run is bit-identical to an
uninterrupted one.

A ``dirpath`` on object storage (``ModelCheckpoint(dirpath="s3://bucket/run")``) gets steps on
the bucket with the object-storage commit (data under a fresh save id, manifest created last;
re-saving ``last.ckpt`` replaces its manifest conditionally, so the previous ``last.ckpt``
stays whole until the new one is complete). fsspec options come from the plugin's
``storage_options`` or from fsspec's and the back end's configuration (``FSSPEC_S3_*``,
``AWS_*``), which Lightning's own ``ModelCheckpoint`` uses too. Lightning's
``ckpt_path="last"`` does not find checkpoints on a bucket (Lightning #18261): resume with
``ckpt_path=last_checkpoint("s3://bucket/run")``.

Needs ``pip install 'torchkeep[lightning]'``. Single-process and DDP strategies (the plugin runs
on global rank 0); sharded strategies (FSDP, ``ModelParallelStrategy``) bypass ``CheckpointIO``:
for FSDP2/TP use ``Trainer(strategy=TorchkeepModelParallelStrategy())`` (from
:mod:`torchkeep.integrations.lightning_sharded`, re-exported here).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
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
from ..manifest import MANIFEST_NAME
from ..remote_files import local_copy
from ..storage.remote import is_remote
from . import _hparams, _steps
from ._location import folder, locate
from ._require import require
from ._steps import Where

require("lightning", extra="lightning", feature="torchkeep.integrations.lightning")

from lightning.fabric.plugins import CheckpointIO  # noqa: E402

if TYPE_CHECKING:
    from ..storage.transfer import Transfer
    from .lightning_sharded import TorchkeepModelParallelStrategy

__all__ = [
    "TorchkeepCheckpointIO",
    "TorchkeepModelParallelStrategy",
    "convert_ckpt",
    "last_checkpoint",
    "load_from_checkpoint",
]

# The keys of Lightning's checkpoint dict that hold the user's hyper-parameters.
HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
# The names ModelCheckpoint gives its "last" checkpoints (last.ckpt, last-v1.ckpt).
_LAST_NAME = re.compile(r"last(-v?[0-9]+)?\.ckpt")


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
        storage_options: fsspec options for checkpoints on URLs (``endpoint_url``,
            credentials); without them fsspec's and the back end's configuration applies.
        transfer: part size, parallelism, retries and deadline of URL transfers.

    Example:
        >>> trainer = L.Trainer(plugins=[TorchkeepCheckpointIO()],
        ...                     callbacks=[ModelCheckpoint(dirpath="s3://bucket/run",
        ...                                                save_last=True)])
        >>> trainer.fit(model, ckpt_path=last_checkpoint("s3://bucket/run"))
    """

    def __init__(
        self,
        *,
        restore_rng: bool = True,
        hparams: Literal["strict", "drop"] = "strict",
        storage_options: Mapping[str, Any] | None = None,
        transfer: Transfer | None = None,
    ) -> None:
        if hparams not in ("strict", "drop"):
            raise ValueError(f"hparams must be 'strict' or 'drop', not {hparams!r}")
        super().__init__()
        self.restore_rng = restore_rng
        self.hparams = hparams
        self.storage_options = storage_options
        self.transfer = transfer

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        """Commit ``checkpoint`` as the step directory (or URL) ``path``, replacing one
        atomically.

        ``storage_options`` (passed by ``trainer.save_checkpoint(..., storage_options=...)``)
        apply to this save of a URL, in place of the plugin's.

        Raises:
            UnsupportedValueError: ``storage_options`` given for a local path, or a value
                cannot be stored without pickle (named by its path); nothing was written.
            StorageCapabilityError: the plugin's ``storage_options`` with a local path, or a
                back end without a conditional replace; nothing was written.
            StorageFullError: the disk filled up; the previous checkpoint at ``path`` is intact.
            RemoteStorageError, StepExistsError: the bucket failed for good, or another
                writer replaced the step meanwhile; the previous checkpoint there is intact.
        """
        if storage_options is not None and not is_remote(path):
            raise UnsupportedValueError(
                f"TorchkeepCheckpointIO takes storage_options for URLs only (got "
                f"{storage_options!r}) while saving the local path {path}; leave them out"
            )
        options = self.storage_options if storage_options is None else storage_options
        self._commit(checkpoint, locate(path, options, self.transfer), capture_rng=True)

    def _commit(self, checkpoint: dict[Any, Any], where: Where, *, capture_rng: bool) -> None:
        values = encode_values(checkpoint, self.hparams)
        step = _steps.step_number(values.get("global_step"))
        _steps.save_values(where, values, step=step, capture_rng=capture_rng)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read and verify the step at ``path`` (a directory or a URL); never unpickles,
        whatever ``weights_only``.

        Restores the random generators saved with it (unless ``restore_rng=False``).

        Raises:
            TorchkeepFileNotFoundError: ``path`` does not exist or holds no committed step.
            FileFormatError: ``path`` is a ``torch.save`` file (convert it with
                :func:`convert_ckpt` first).
            CorruptFileError: a file of the step is damaged (nothing was restored).
        """
        where = locate(path, self.storage_options, self.transfer)
        if isinstance(where, Path):
            _check_local_step(where)
        values, states = _steps.load_values(where)
        values = decode_values(values)
        device = _device(map_location)
        if device is not None:
            values = _to_device(values, device)
        if self.restore_rng and states is not None:
            rng.restore(states)
        return values

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove the checkpoint at ``path``: renamed out of sight first, then deleted (on
        object storage: its manifest first, then its data)."""
        _steps.remove_step(locate(path, self.storage_options, self.transfer))


def _check_local_step(source: Path) -> None:
    """Refuse a local ``source`` that is a file or missing, naming the fix."""
    if source.is_file():
        raise FileFormatError(
            f"{source} is a file, not a torchkeep checkpoint step (a checkpoint Lightning "
            "wrote with torch.save?); convert it once with "
            f"torchkeep.integrations.lightning.convert_ckpt({str(source)!r}, 'new.ckpt')"
        )
    if not source.exists():
        raise TorchkeepFileNotFoundError(f"checkpoint {source} does not exist")


def convert_ckpt(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    hparams: Literal["strict", "drop"] = "strict",
    storage_options: Mapping[str, Any] | None = None,
    transfer: Transfer | None = None,
) -> Path | str:
    """Rewrite a ``.ckpt`` Lightning saved with ``torch.save`` as a torchkeep step.

    The file is scanned and read with the weights-only unpickler (nothing in it runs; a file
    that names code is refused). The result loads through :class:`TorchkeepCheckpointIO`
    (``trainer.fit(model, ckpt_path=destination)``); it holds no generator states, as the
    source had none. Either side may be a URL (``storage_options`` and ``transfer`` reach
    whichever is).

    Returns:
        The destination: a ``Path``, or the URL as given.

    Raises:
        UnsafeCheckpointError: the file refers to code beyond tensors and containers.
        FileFormatError: the file holds no checkpoint dict.
    """
    from ..formats import torch_zip
    from ..remote_files import check_options_used

    check_options_used((source, destination), storage_options, transfer)
    source_options = storage_options if is_remote(source) else None
    with local_copy(source, source_options, transfer if is_remote(source) else None) as local:
        data = torch_zip.load(local, map_location="cpu")
    if not isinstance(data, dict):
        raise FileFormatError(f"{source} holds a {type(data).__name__}, not a checkpoint dict")
    remote = is_remote(destination)
    where = locate(destination, *((storage_options, transfer) if remote else (None, None)))
    TorchkeepCheckpointIO(hparams=hparams)._commit(data, where, capture_rng=False)
    return where if isinstance(where, Path) else os.fspath(destination)


def last_checkpoint(
    dirpath: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    transfer: Transfer | None = None,
) -> str | None:
    """The newest committed ``last*.ckpt`` step in ``dirpath`` (a folder or a URL), or None.

    For ``trainer.fit(model, ckpt_path=last_checkpoint("s3://bucket/run"))``: Lightning's own
    ``ckpt_path="last"`` does not find checkpoints on object storage (its ``ModelCheckpoint``
    lists the folder with fsspec, which returns names without ``s3://``, and then looks them up
    on the local disk; Lightning issue #18261), so it warns and trains from scratch. Only
    committed steps count (a manifest is there); the newest is the one whose manifest was
    written last. The step is verified when it is loaded.

    Raises:
        StorageCapabilityError: options given with a local path.
        RemoteStorageError: the listing failed for good.
    """
    store = folder(dirpath, storage_options, transfer)
    if isinstance(store, Path):
        found = {
            str(child): (child / MANIFEST_NAME).stat().st_mtime
            for child in (store.iterdir() if store.is_dir() else ())
            if _LAST_NAME.fullmatch(child.name) and (child / MANIFEST_NAME).is_file()
        }
    else:
        found = {
            store.url(key.split("/")[0]): modified
            for key, modified in store.keys(maxdepth=2).items()
            if key.count("/") == 1
            and key.endswith("/" + MANIFEST_NAME)
            and _LAST_NAME.fullmatch(key.split("/")[0])
        }
    return max(found, key=found.__getitem__) if found else None


def load_from_checkpoint(
    cls: type[Any],
    path: str | os.PathLike[str],
    *,
    map_location: Any | None = None,
    strict: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint(path)`` for a checkpoint written by the plugin.

    Lightning's own ``load_from_checkpoint`` reads files with ``torch.load``; this reads the
    step (verified, no pickle; ``path`` may be a URL, with ``storage_options``), then builds
    the module from its hyper-parameters (``kwargs`` override them) and loads its weights with
    Lightning's own logic. The random generators are left alone.

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
    plugin = TorchkeepCheckpointIO(restore_rng=False, storage_options=storage_options)
    checkpoint = plugin.load_checkpoint(path, map_location)
    return _load_state(cls, checkpoint, strict=strict, **kwargs)
