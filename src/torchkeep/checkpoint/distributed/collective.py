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
import json
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.api import CheckpointException

from ... import errors
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


def failures(error: BaseException | None, group: Any, what: str) -> dict[int, BaseException]:
    """Every failed rank's error, by rank, at one step ``what`` of a collective operation
    (empty when no rank failed).

    When no rank failed this costs one ``all_reduce`` of a flag; only a failure gathers the
    errors. Every rank's error, this rank's included, comes back rebuilt the same way on
    every rank (:func:`_rebuilt`), so that every rank that decides by the errors' types
    decides alike; raise ``error`` itself on the rank that failed.

    Raises:
        DistributedCheckpointError: a peer died or stopped answering (the group's timeout).
    """
    if group is None:
        return {} if error is None else {0: error}
    me = dist.get_rank(group)
    mine = None if error is None else (_public_type(error), first_line(error))
    try:
        flag = torch.tensor([mine is not None], dtype=torch.int32, device=_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if not flag.item():
            return {}
        reports = all_gather(mine, group)
    except Exception as exc:  # a lost peer or the timeout: no rank can go on
        raise translate(exc, what, me=me) from exc
    return {r: _rebuilt(*report) for r, report in enumerate(reports) if report is not None}


def _device(group: Any) -> torch.device:
    """Where a tensor for a collective on ``group`` must live (NCCL takes CUDA tensors only)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _public_type(error: BaseException) -> str:
    """The name of ``error``'s nearest type that :mod:`torchkeep.errors` defines (its own type
    name when it has none): what :func:`_rebuilt` can rebuild on every rank."""
    for kind in type(error).__mro__:
        name: str = kind.__name__
        if getattr(errors, name, None) is kind and issubclass(kind, TorchkeepError):
            return name
    return type(error).__name__


def _rebuilt(type_name: str, text: str) -> BaseException:
    """A rank's error from its type name and first line: that torchkeep error type, or a
    ``RuntimeError`` naming any other type."""
    kind = getattr(errors, type_name, None)
    if isinstance(kind, type) and issubclass(kind, TorchkeepError):
        return kind(text)
    return RuntimeError(f"{type_name}: {text}")


def all_equal(value: Any, group: Any) -> bool:
    """Whether ``value`` (JSON-like) is the same on every rank (collective: one ``all_reduce``
    of a 64-bit digest and its negation, whose maxima are the largest and smallest digest)."""
    if group is None:
        return True
    text = json.dumps(value, sort_keys=True).encode()
    digest = int.from_bytes(xxhash.xxh3_64_digest(text), "little", signed=True) >> 1
    extremes = torch.tensor([digest, -digest], dtype=torch.int64, device=_device(group))
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    return bool(extremes[0].item() == -extremes[1].item())


def agree(error: BaseException | None, group: Any, what: str) -> None:
    """Raise on every rank if ``error`` is set on any rank (before anything is written).

    The rank that failed raises its own error; the others raise
    :class:`DistributedCheckpointError` naming it, so no rank enters a collective another
    rank will never join.
    """
    failed = failures(error, group, what)
    if error is not None:
        raise error
    if failed:
        raise DistributedCheckpointError(
            f"{what} failed on {summary(failed)} before anything was written; fix the cause on "
            "that rank and call it again on every rank",
            failed,
        )


def summary(failed: dict[int, BaseException]) -> str:
    """``rank(s) [1, 3] (rank 1: Type: first line; rank 3: ...)`` for an error message."""
    causes = "; ".join(
        f"rank {r}: {type(cause).__name__}: {first_line(cause)}"
        for r, cause in sorted(failed.items())
    )
    return f"rank(s) {sorted(failed)} ({causes})"


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
