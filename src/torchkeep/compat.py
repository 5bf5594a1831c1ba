"""The one place for torch-version differences.

torchkeep supports torch 2.4 to 2.15 (``make test-compat`` runs the whole suite under the oldest
and the newest). Everything that differs between those versions is decided here, from the
installed torch's version, never by scattered ``hasattr`` checks:

- **programs**: the scan that proves a ``.pt2`` file plain data (:mod:`torchkeep.security.programs`)
  follows the code sites of ``torch.export.load`` in the versions listed in
  :data:`PROGRAM_LOADERS_EXAMINED`. Under any other torch, ``load_model(..., trust_program=True)``
  refuses with :class:`~torchkeep.errors.UnsafeCheckpointError` saying so, because a loader
  nobody examined may turn fields the whitelists do not know into code. Writing programs, and
  scanning them, work everywhere.
- **ONNX**: ``torch.onnx.export(..., dynamo=True)`` exists from torch 2.5; under 2.4 torchkeep
  uses the TorchScript exporter (``report.exporter == "torchscript"``).
- **weights-only unpickling**: torch 2.4's allowlist lacks plain builtins that later ones accept
  (a pickled ``nn.Module`` holds a ``set``); :data:`NEWER_WEIGHTS_ONLY_GLOBALS` adds them, and
  :func:`extra_safe_globals` extends the allowlist for one block (torch 2.4 has no
  ``torch.serialization.safe_globals`` context manager).
- **sharded checkpoints** (a distributed ``CheckpointManager``, the DCP storage writer and
  reader) need torch >= 2.6 (:data:`SHARDED_CHECKPOINTS_FROM`): they use the public DTensor and
  FSDP2 APIs. Under an older torch they raise
  :class:`~torchkeep.errors.DistributedCheckpointError` before touching anything. ``ls``,
  ``inspect`` and ``verify`` of a sharded step work everywhere; reading its tensors in one
  process (``convert``, ``load_state_dict``) goes through DCP and needs the same torch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import DistributedCheckpointError, UnsafeCheckpointError

OLDEST_SUPPORTED = (2, 4)
"""The oldest torch (major, minor) torchkeep supports and tests."""

PROGRAM_LOADERS_EXAMINED = frozenset({(2, 13), (2, 15)})
"""The torch versions whose ``torch.export.load`` code sites the program scan was checked
against (README, "Why trust_program"). 2.13 was examined when the scan was built; 2.15 by
diffing its loader against 2.13's (``torch/_export/serde``, ``torch/export/pt2_archive``,
``exported_program.py``, ``_unlift.py``, FX code generation, the sympy evaluation in
``symbolic_shapes.py``): no new place turns file contents into code, and the hostile-program
tests pass under it with their payloads proven live against its own loader. 2.4 (an older
archive layout) and 2.14 were not examined."""


def torch_version(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of ``version`` (default: the installed torch), e.g. ``(2, 13)``."""
    match = re.match(r"(\d+)\.(\d+)", version or torch.__version__)
    if match is None:
        raise ValueError(f"cannot parse the torch version {version or torch.__version__!r}")
    return int(match.group(1)), int(match.group(2))


def program_loader_examined() -> bool:
    """True when the installed torch's program loader is one the scan was checked against."""
    return torch_version() in PROGRAM_LOADERS_EXAMINED


def require_examined_program_loader(path: Path) -> None:
    """Refuse to load the program at ``path`` under a torch whose loader was not examined.

    Raises:
        UnsafeCheckpointError: the installed torch is not in :data:`PROGRAM_LOADERS_EXAMINED`.
    """
    if program_loader_examined():
        return
    examined = ", ".join(f"{major}.{minor}" for major, minor in sorted(PROGRAM_LOADERS_EXAMINED))
    raise UnsafeCheckpointError(
        f"{path} was not loaded: trust_program=True needs a torch whose torch.export.load "
        f"torchkeep's program scan was checked against ({examined}), and this is torch "
        f"{torch.__version__}, whose loader may turn fields the scan does not know into code. "
        "Load the bundle with its class installed instead, or use a checked torch"
    )


NEWER_WEIGHTS_ONLY_GLOBALS: dict[str, object] = {
    "builtins.set": set,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
}
"""Builtins that build plain values (nothing runs) and that torch 2.5+'s weights-only unpickler
accepts by itself; torchkeep treats them as safe under every supported torch."""


def weights_only_additions() -> list[object]:
    """The :data:`NEWER_WEIGHTS_ONLY_GLOBALS` the installed torch's allowlist lacks."""
    from torch import _weights_only_unpickler

    allowed = _weights_only_unpickler._get_allowed_globals()
    return [obj for name, obj in NEWER_WEIGHTS_ONLY_GLOBALS.items() if name not in allowed]


@contextlib.contextmanager
def extra_safe_globals(objects: Sequence[Any]) -> Iterator[None]:
    """Extend torch's weights-only allowlist by ``objects`` (and :func:`weights_only_additions`)
    for the duration of the block only."""
    serialization: Any = torch.serialization
    added = [*objects, *weights_only_additions()]
    if hasattr(serialization, "safe_globals"):  # torch >= 2.5
        with serialization.safe_globals(added):
            yield
        return
    before = list(serialization.get_safe_globals())  # torch 2.4 returns its live list
    serialization.add_safe_globals(added)
    try:
        yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(before)


def onnx_dynamo_export_available() -> bool:
    """True when ``torch.onnx.export`` takes ``dynamo=True`` (torch 2.5 and newer)."""
    return torch_version() >= (2, 5)


SHARDED_CHECKPOINTS_FROM = (2, 6)
"""The oldest torch (major, minor) for writing and restoring sharded steps: the first release
whose DTensor (``torch.distributed.tensor``) and FSDP2 (``torch.distributed.fsdp.fully_shard``)
APIs are public. The suite runs them under torch 2.13 and 2.15 and checks the refusal under 2.4."""


def sharded_checkpoints_available() -> bool:
    """True when the installed torch can write and restore sharded steps."""
    return torch_version() >= SHARDED_CHECKPOINTS_FROM


def require_sharded_checkpoints(what: str, fix: str = "Upgrade torch") -> None:
    """Refuse ``what`` (a distributed manager, the DCP writer or reader) under a torch too old
    for sharded checkpoints, before anything is read, written or joined.

    Raises:
        DistributedCheckpointError: the installed torch is older than
            :data:`SHARDED_CHECKPOINTS_FROM`.
    """
    if sharded_checkpoints_available():
        return
    needed = ".".join(map(str, SHARDED_CHECKPOINTS_FROM))
    raise DistributedCheckpointError(
        f"{what} needs torch >= {needed} (public DTensor and FSDP2 APIs), and this is torch "
        f"{torch.__version__}. {fix}"
    )
