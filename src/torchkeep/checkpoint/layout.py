"""Where checkpoint steps live on disk and how to list the committed ones.

A checkpoint folder holds one ``step-<zero-padded step>/`` directory per committed step, each
with a ``manifest.json`` of kind :data:`KIND` written last. Anything else in the folder
(temporary directories of interrupted saves, the user's own files) is not a step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError, TorchkeepFileNotFoundError
from ..manifest import read_manifest

KIND = "torchkeep.checkpoint"
STATE_NAME = "state.json"
_STEP_DIR = re.compile(r"step-(\d+)")


def step_path(directory: Path, step: int) -> Path:
    """The directory of ``step`` in ``directory`` (``step-00000042``)."""
    return directory / f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step number of a step directory name, or None for any other name."""
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class StepInfo:
    """A committed step as its manifest describes it (file contents are not checked here)."""

    step: int
    path: Path
    created: float
    metrics: dict[str, float]
    size: int
    manifest: dict[str, Any] = field(repr=False, compare=False)

    def metric(self, name: str) -> float | None:
        """The value of metric ``name``, or None when absent or not a number."""
        value = self.metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return None
        return float(value)


def read_step_info(path: Path) -> StepInfo | None:
    """Describe the step at ``path``, or None if it is not a committed torchkeep step."""
    step = parse_step(path.name)
    if step is None or not path.is_dir():
        return None
    try:
        manifest = read_manifest(path, kind=KIND)
    except (TorchkeepFileNotFoundError, CorruptFileError):
        return None
    metrics = manifest.get("metrics")
    files = manifest["files"].values()
    return StepInfo(
        step=step,
        path=path,
        created=float(manifest.get("created", 0.0)),
        metrics=dict(metrics) if isinstance(metrics, dict) else {},
        size=sum(r.get("size", 0) for r in files if isinstance(r, dict)),
        manifest=manifest,
    )


def list_steps(directory: Path) -> list[StepInfo]:
    """Every committed step in ``directory``, oldest first; an absent directory has none."""
    if not directory.is_dir():
        return []
    infos = [read_step_info(child) for child in directory.iterdir()]
    return sorted((info for info in infos if info is not None), key=lambda info: info.step)


def uncommitted_steps(directory: Path) -> list[Path]:
    """Step-named directories without a valid checkpoint manifest (damaged or foreign)."""
    return sorted(
        child
        for child in directory.iterdir()
        if parse_step(child.name) is not None and read_step_info(child) is None
    )
