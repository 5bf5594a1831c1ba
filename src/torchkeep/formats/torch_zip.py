"""Files written by ``torch.save``, read with weights-only semantics (no code is executed)."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, UnsafeCheckpointError, first_line
from ..storage.local import atomic_file

# torch's weights-only unpickler lets these escape when a pickle stream is damaged (an opcode
# reading a missing memo entry or an empty stack, a tensor rebuilt from the wrong arguments).
_DAMAGED_PICKLE_ERRORS = (KeyError, IndexError, TypeError, AttributeError, AssertionError)


def save(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Atomically write ``tensors`` as a ``torch.save`` zip loadable with ``weights_only=True``."""
    with atomic_file(path) as f:
        torch.save(dict(tensors), f)


def load(path: Path, *, map_location: torch.device | str | None = None) -> Any:
    """Load a ``torch.save`` file with torch's weights-only unpickler, memory-mapped if possible.

    Only tensors, containers and primitive values can come back; a file that names any other
    global raises :class:`UnsafeCheckpointError` and nothing it names is imported or run. The
    file is scanned first, so one that hides dangerous pickles anywhere (in members torch
    would not read, or after the data it reads) is refused as a whole.
    """
    _check_before_loading(path)
    try:
        if path.suffix == ".safetensors":
            # torch.load routes paths with this suffix to safetensors; pass the open file.
            with open(path, "rb") as f:
                return torch.load(f, map_location=map_location, weights_only=True)
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (pre-zip) files cannot be memory-mapped; read them normally.
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} refers to Python objects beyond tensors and containers, so loading it "
            f"could run code, and it was refused ({first_line(exc)}). Run `torchkeep scan {path}` "
            "to see what it imports; whole pickled models load with "
            "tk.load_pickled_model(path, allow=...)"
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError, *_DAMAGED_PICKLE_ERRORS) as exc:
        raise CorruptFileError(
            f"{path} could not be read as a torch.save file ({type(exc).__name__}: {exc}); "
            "it is truncated or damaged"
        ) from None


def _check_before_loading(path: Path) -> None:
    from ..security.scanner import scan  # the scanner reads formats; import it lazily

    report = scan(path)
    dangerous = report.dangerous
    if dangerous:
        listed = ", ".join(f"{f.name} at {f.where}" for f in dangerous[:5])
        raise UnsafeCheckpointError(
            f"{path} contains pickled code that could run on loading ({listed}) and was "
            f"refused. Run `torchkeep scan {path}` for the full list; do not load this file"
        )
    if report.problems:
        listed = "; ".join(report.problems[:5])
        more = f" (and {len(report.problems) - 5} more)" if len(report.problems) > 5 else ""
        raise CorruptFileError(
            f"{path} is damaged: {listed}{more}. Loading it would fail or return wrong tensors; "
            "re-create it from its source"
        )
