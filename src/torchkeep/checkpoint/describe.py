"""``inspect`` support for checkpoint steps and checkpoint folders (read from the manifest)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..describe import DESCRIBERS, Description, describe
from ..errors import TorchkeepFileNotFoundError
from ..formats import Format
from ..manifest import read_manifest
from .layout import KIND, STATE_NAME, list_steps


def _when(created: object) -> str:
    if not isinstance(created, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created))


def _plain_values(step_dir: Path) -> list[tuple[str, str]]:
    """The entries saved as plain values (``epoch=3``), as stored in ``state.json``."""
    state = json.loads((step_dir / STATE_NAME).read_bytes())
    return [
        (name, json.dumps(entry.get("value")))
        for name, entry in state.get("entries", {}).items()
        if entry.get("kind") == "value"
    ]


def _describe_step(path: Path) -> Description:
    manifest = read_manifest(path, kind=KIND)
    description = Description(path, Format.CHECKPOINT_STEP, 0)
    for name, record in sorted(manifest["files"].items()):
        description.size += int(record.get("size", 0))
        if not name.endswith(".safetensors"):
            continue
        stem = name.removesuffix(".safetensors")
        inner = describe(path / name)
        description.tensors += [
            type(t)(f"{stem}.{t.name}", t.dtype, t.shape, t.nbytes) for t in inner.tensors
        ]
        for target, aliases in inner.tied.items():
            description.tied[f"{stem}.{target}"] = [f"{stem}.{a}" for a in aliases]
    metrics = manifest.get("metrics") or {}
    description.sections["checkpoint"] = [
        ("step", str(manifest.get("step"))),
        ("saved", _when(manifest.get("created"))),
        ("metrics", ", ".join(f"{k}={v:g}" for k, v in metrics.items()) or "none"),
        ("files", ", ".join(sorted(manifest["files"]))),
        ("saved with", f"torchkeep {manifest.get('torchkeep_version')}, "
                       f"torch {manifest.get('torch_version')}"),
    ]  # fmt: skip
    values = _plain_values(path)
    if values:
        description.sections["values"] = values
    description.notes.append("hashes are not checked here; `torchkeep verify` checks them")
    return description


def _describe_folder(path: Path) -> Description:
    steps = list_steps(path)
    if not steps:
        raise TorchkeepFileNotFoundError(f"{path} holds no committed checkpoint step")
    description = _describe_step(steps[-1].path)
    description.path, description.format = path, Format.CHECKPOINT_DIR
    description.size = sum(info.size for info in steps)
    description.sections["steps"] = [(str(info.step), _when(info.created)) for info in steps]
    description.notes.insert(
        0, f"tensors and values are those of the latest step, {steps[-1].step}"
    )
    return description


DESCRIBERS[Format.CHECKPOINT_STEP] = _describe_step
DESCRIBERS[Format.CHECKPOINT_DIR] = _describe_folder
