"""Sharded Lightning checkpoints (FSDP2, tensor parallelism) as torchkeep steps, no pickle.

``Trainer(strategy=TorchkeepModelParallelStrategy())`` instead of ``ModelParallelStrategy()``.
Lightning's own strategy bypasses ``CheckpointIO``: it writes DCP's pickled ``.metadata`` and a
``torch.save``'d ``meta.pt``, and reads them back with ``torch.load``. This one writes every
path Lightning chooses (``last.ckpt``, ``epoch=3-step=32.ckpt``) as a torchkeep sharded step
through the distributed checkpoint layer: each rank streams its own model and optimizer shards
into one safetensors file, the rest of Lightning's dict (loops, callbacks, schedulers,
hyper-parameters) is stored once as typed JSON and checked equal on every rank, each rank's
random generators are stored and restored, and rank 0 commits the step (manifest last, atomic
rename or exchange) only after every rank has written. Loading verifies every chunk on every
rank before anything changes and never unpickles.

A ``dirpath`` on object storage is refused (:class:`~torchkeep.StorageCapabilityError`, naming
the URL) before anything is written: Lightning's checkpoint calls hand this strategy a path the
sharded step layer writes as a local (or shared-filesystem) folder. For sharded steps on a
bucket, save with ``tk.CheckpointManager("s3://...")`` from the module's hooks instead.

Needs ``pip install 'torchkeep[lightning]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from ..errors import UnsupportedValueError
from . import _steps
from ._location import Location, local_path
from ._require import require

require("lightning", extra="lightning", feature="torchkeep.integrations.lightning_sharded")

from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from ..checkpoint.distributed import collective  # noqa: E402
from ..checkpoint.distributed.session import DistributedSession, entry_names_ok  # noqa: E402
from .lightning import decode_values, encode_values  # noqa: E402

__all__ = ["TorchkeepModelParallelStrategy"]

# Lightning's entries for the model and optimizers; stored sharded as "model" and "optimizer".
_SHARDED_KEYS = ("state_dict", "optimizer_states")


class TorchkeepModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2/TP) writing sharded torchkeep steps.

    Save and load are collective (Lightning calls them on every rank). The model and optimizer
    states are taken from the live objects with ``get_state_dict`` (as Lightning's own strategy
    does) and restored into them with ``set_state_dict``; the dict returned by
    :meth:`load_checkpoint` holds the rest, as Lightning's own does.

    Args:
        restore_rng: put every rank's random generators back as they were at the save (on the
            same world size), which a bit-identical resume needs.
        hparams: ``"strict"`` stores ``argparse.Namespace`` and dataclass hyper-parameters as
            data and refuses any other value that cannot be stored without pickle, naming its
            path, before anything is written; ``"drop"`` leaves such values out with a warning.
        per_rank: entries of Lightning's dict (``"callbacks"``...) to store once per rank
            instead of once for all (they are checked equal on every rank otherwise).
        checkpoint_timeout: seconds a checkpoint collective waits for the other ranks before
            every rank raises (the checkpoints run on a gloo group of their own).
        **kwargs: passed to ``ModelParallelStrategy`` (``data_parallel_size``,
            ``tensor_parallel_size``, ``process_group_backend``, ``timeout``).

    Example:
        >>> trainer = L.Trainer(devices=2, strategy=TorchkeepModelParallelStrategy(),
        ...                     callbacks=[ModelCheckpoint(dirpath="ckpt", save_last=True)])
        >>> trainer.fit(model, ckpt_path="last")
    """

    def __init__(
        self,
        *,
        restore_rng: bool = True,
        hparams: Literal["strict", "drop"] = "strict",
        per_rank: tuple[str, ...] = (),
        checkpoint_timeout: float = 600.0,
        **kwargs: Any,
    ) -> None:
        if hparams not in ("strict", "drop"):
            raise ValueError(f"hparams must be 'strict' or 'drop', not {hparams!r}")
        if kwargs.get("save_distributed_checkpoint", True) is not True:
            raise ValueError(
                "TorchkeepModelParallelStrategy always saves sharded checkpoints; for one "
                "full-state file use ModelParallelStrategy(save_distributed_checkpoint=False) "
                "with plugins=[TorchkeepCheckpointIO()]"
            )
        kwargs.pop("save_distributed_checkpoint", None)
        super().__init__(**kwargs)
        self.restore_rng = restore_rng
        self.hparams = hparams
        self.per_rank = tuple(entry_names_ok(per_rank))
        self.checkpoint_timeout = checkpoint_timeout
        self._session: DistributedSession | None = None

    def _local(self, location: Location) -> Path:
        """``location`` as a local path; a URL is refused (the same on every rank)."""
        return local_path(
            location,
            feature=type(self).__name__,
            fix="use a local or shared-filesystem dirpath, or save sharded steps to the bucket "
            "with tk.CheckpointManager('s3://...') (collective, every rank uploads its shard)",
        )

    def _checkpoint_session(self, path: Path) -> DistributedSession:
        """The session over the checkpoint group (made on first use, on every rank)."""
        if self._session is None:
            self._session = DistributedSession(
                path.parent,
                group=collective.new_group(self.checkpoint_timeout),
                options=None,
                per_rank=self.per_rank,
                save_rng=True,
            )
        return self._session

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        filepath: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        """Commit ``checkpoint`` as the sharded step ``filepath`` (collective).

        An existing step there is replaced atomically once the new one is complete.

        Raises:
            UnsupportedValueError: ``storage_options`` were given, or a value cannot be stored
                without pickle (named by its path), or an entry differs between ranks; on
                every rank, nothing written.
            StorageCapabilityError: ``filepath`` is a URL; on every rank, nothing written.
            DistributedCheckpointError: a rank failed while writing; nothing committed.
        """
        if storage_options is not None:
            raise UnsupportedValueError(
                f"{type(self).__name__} takes no storage_options (got {storage_options!r}) "
                f"while saving {filepath}; leave them out"
            )
        path = self._local(self.broadcast(os.fspath(filepath)))
        session = self._checkpoint_session(path)
        step = _steps.step_number(checkpoint.get("global_step"))
        prepared, error = None, None
        try:
            rest = {k: v for k, v in checkpoint.items() if k not in _SHARDED_KEYS}
            slots = {"model": self.model, "optimizer": list(self.optimizers) or None}
            prepared = session.prepare(slots, encode_values(rest, self.hparams))
        except Exception as exc:  # raised on every rank by check()
            error = exc
        session.check(step, prepared, error, overwrite=True)
        assert prepared is not None
        session.write(step, prepared, overwrite=True, fields={"metrics": {}}, path=path)

    def load_checkpoint(
        self, checkpoint_path: str | os.PathLike[str], weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Restore the model and optimizers from the step at ``checkpoint_path`` (collective)
        and return the rest of Lightning's dict; never unpickles, whatever ``weights_only``.

        Every rank verifies the chunks it reads before anything changes; the random generators
        are restored per rank (unless ``restore_rng=False``).

        Raises:
            TorchkeepFileNotFoundError: no committed step at ``checkpoint_path``.
            CorruptFileError: a file of the step is damaged (nothing was restored).
            StateDictMismatchError: the step does not fit the model or optimizers.
        """
        path = self._local(self.broadcast(os.fspath(checkpoint_path)))
        session = self._checkpoint_session(path)
        targets = {"model": self.model, "optimizer": list(self.optimizers) or None}
        strict = self.lightning_module.strict_loading if self.lightning_module else True
        restored = session.restore_at(
            path,
            {k: v for k, v in targets.items() if v is not None},
            restore_rng=self.restore_rng,
            strict=strict,
        )
        return decode_values(dict(restored.extra))

    def remove_checkpoint(self, filepath: str | os.PathLike[str]) -> None:
        """Remove the step at ``filepath`` on rank 0: renamed out of sight, then deleted."""
        path = self._local(filepath)
        if self.is_global_zero:
            _steps.remove_step(path)

    def teardown(self) -> None:
        """Lightning's teardown; the checkpoint group goes with the process group."""
        self._session = None
        super().teardown()
