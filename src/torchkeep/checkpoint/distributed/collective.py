"""The checkpoint process group, agreement between ranks, and DCP error translation.

Every collective of a checkpoint runs on a gloo group of its own, made by the manager's
constructor with a timeout, so a background save never interleaves with training
collectives and a dead peer turns into an error within the timeout instead of a hang.
DCP reports failures as ``CheckpointException``, a ``BaseException`` that ``except Exception``
misses; :func:`translate` turns it, and raw collective errors, into
:class:`~torchkeep.errors.DistributedCheckpointError` with per-rank causes.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ...errors import DistributedCheckpointError, TorchkeepError, first_line


def new_group(timeout: float) -> Any:
    """A new gloo group over every rank (collective: all ranks call it in the same order)."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))


def rank(group: Any) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if group is not None else 0


def world_size(group: Any) -> int:
    """The size of ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if group is not None else 1


@contextlib.contextmanager
def single_process_quiet(group: Any) -> Iterator[None]:
    """Silence DCP's "torch.distributed is disabled ... single process" warning when there is
    deliberately no process group (a restore or consolidation in one process)."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def all_gather(value: Any, group: Any) -> list[Any]:
    """Every rank's ``value`` (JSON-like, from the same job: trusted), in rank order."""
    if group is None:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def broadcast(value: Any, group: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def agree(error: BaseException | None, group: Any, what: str) -> None:
    """Raise on every rank if ``error`` is set on any rank (before anything is written).

    The rank that failed raises its own error; the others raise
    :class:`DistributedCheckpointError` naming it, so no rank enters a collective another
    rank will never join.
    """
    reports = all_gather(
        None if error is None else f"{type(error).__name__}: {first_line(error)}", group
    )
    if error is not None:
        raise error
    failed = {r: text for r, text in enumerate(reports) if text is not None}
    if failed:
        causes = "; ".join(f"rank {r}: {text}" for r, text in failed.items())
        raise DistributedCheckpointError(
            f"{what} failed on rank(s) {sorted(failed)} before anything was written ({causes}); "
            "fix the cause on that rank and call it again on every rank",
            {r: RuntimeError(text) for r, text in failed.items()},
        )


def causes(exc: BaseException) -> dict[int, BaseException]:
    """The per-rank causes carried by a DCP ``CheckpointException`` (empty for others)."""
    if isinstance(exc, CheckpointException):
        return {r: pair[0] if isinstance(pair, tuple) else pair for r, pair in exc.failures.items()}
    return {}


def translate(exc: BaseException, what: str, *, me: int) -> DistributedCheckpointError:
    """A :class:`DistributedCheckpointError` for a failed collective ``what``.

    ``exc`` is DCP's ``CheckpointException`` (per-rank causes) or the error of a collective
    that lost a peer (a killed rank, the group's timeout).
    """
    failures = causes(exc) or {me: exc}
    lines = "; ".join(
        f"rank {r}: {type(cause).__name__}: {first_line(cause)}"
        for r, cause in sorted(failures.items())
    )
    hint = (
        "a peer process died or stopped answering (see the group's timeout)"
        if not isinstance(exc, CheckpointException)
        else "nothing was committed"
    )
    return DistributedCheckpointError(f"{what} failed ({lines}); {hint}", failures)


def only_cause(exc: BaseException, kind: type[TorchkeepError]) -> bool:
    """True when every per-rank cause of a DCP failure is a ``kind``."""
    found = causes(exc)
    return bool(found) and all(isinstance(cause, kind) for cause in found.values())
