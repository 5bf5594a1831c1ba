"""``inspect`` support for checkpoint steps and checkpoint folders (read from the manifest)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..describe import DESCRIBERS, Description, describe, shorten
from ..errors import CorruptFileError, TorchkeepFileNotFoundError, first_line
from ..formats import Format
from ..hashing import new_hasher
from ..manifest import files_folder
from .layout import RNG_ENTRY, list_steps, read_state, read_step_manifest
from .lazy import need
from .reader import _adopt_legacy_rng


def _when(created: object) -> str:
    if not isinstance(created, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created))


def _entries(step_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The step's entries as ``state.json`` records them, a 0.1.0 step's ``rng`` entry read as
    the generator states (as ``restore`` reads it)."""
    if manifest.get("layout") == "sharded-v1":
        from .distributed.layout import read_sharded_state

        state = read_sharded_state(step_dir, manifest)
    else:
        state = read_state(step_dir, manifest)
    entries = dict(state["entries"])
    _adopt_legacy_rng(manifest, entries)
    return entries


def _plain_values(entries: dict[str, Any]) -> list[tuple[str, str]]:
    """The entries saved as plain values (``epoch=3``), as stored in ``state.json``."""
    return [
        (name, shorten(json.dumps(entry["value"])))
        for name, entry in entries.items()
        if entry["kind"] == "value" and name != RNG_ENTRY
    ]


def _short_hash(node: object) -> str:
    hasher = new_hasher()
    hasher.update(json.dumps(node, sort_keys=True).encode())
    return hasher.hexdigest()[:12]


def _generator_summary(name: str, node: object, shapes: dict[str, list[int]]) -> str:
    """One line for a generator's stored state: its kind, its size and a short hash (of the
    JSON, and of the tensor file's content through the manifest), never the state itself."""
    items = node.get("$tuple") if isinstance(node, dict) else None
    if name == "python" and isinstance(items, list) and len(items) == 3:
        words = items[1].get("$tuple") if isinstance(items[1], dict) else None
        size = f"{len(words)} words" if isinstance(words, list) else "?"
        return f"Python random (version {items[0]}), {size}, hash {_short_hash(node)}"
    if name == "numpy" and isinstance(items, list) and items:
        ref = items[1].get("$tensor") if len(items) > 1 and isinstance(items[1], dict) else None
        return f"NumPy {items[0]}, {shapes.get(str(ref), ['?'])[0]} words, hash {_short_hash(node)}"
    if isinstance(node, dict) and "$tensor" in node:
        return f"torch CPU generator, {shapes.get(node['$tensor'], ['?'])[0]} bytes"
    if isinstance(node, list):
        return f"{len(node)} torch {name.upper()} device generators"
    return f"{type(node).__name__}, hash {_short_hash(node)}"


def _generator_rows(
    entries: dict[str, Any], manifest: dict[str, Any], tensors: list[Any]
) -> list[tuple[str, str]]:
    """The ``random generators`` section: a summary per generator (the full state is hundreds
    of numbers and means nothing to a reader)."""
    entry = entries.get(RNG_ENTRY)
    if entry is None or not isinstance(entry.get("value"), dict):
        return []
    file = entry.get("file")
    stem = str(file).removesuffix(".safetensors")
    shapes = {t.name.removeprefix(f"{stem}."): list(t.shape) for t in tensors}
    rows = [(name, _generator_summary(name, node, shapes)) for name, node in entry["value"].items()]
    record = manifest["files"].get(file) if file else None
    if isinstance(record, dict):
        rows.append(("tensor file", f"{file}, hash {str(record.get('hash'))[:12]}"))
    return rows


def _describe_step(path: Path) -> Description:
    manifest = read_step_manifest(path)
    description = Description(path, Format.CHECKPOINT_STEP, 0)
    folder = files_folder(path, manifest)
    for name, record in sorted(manifest["files"].items()):
        description.size += record["size"]
        if not name.endswith(".safetensors"):
            continue
        stem = name.removesuffix(".safetensors")
        inner = describe(folder / name)
        description.tensors += [
            type(t)(f"{stem}.{t.name}", t.dtype, t.shape, t.nbytes) for t in inner.tensors
        ]
        for target, aliases in inner.tied.items():
            description.tied[f"{stem}.{target}"] = [f"{stem}.{a}" for a in aliases]
    metrics = manifest.get("metrics", {})
    description.sections["checkpoint"] = [
        ("step", str(manifest.get("step"))),
        ("saved", _when(manifest.get("created"))),
        ("metrics", ", ".join(f"{k}={v:g}" for k, v in metrics.items()) or "none"),
        ("files", ", ".join(sorted(manifest["files"]))),
        ("saved with", f"torchkeep {manifest.get('torchkeep_version')}, "
                       f"torch {manifest.get('torch_version')}"),
    ]  # fmt: skip
    if manifest.get("layout") == "sharded-v1":
        description.sections["sharded"] = _sharded_section(path, manifest)
    entries = _entries(path, manifest)
    values = _plain_values(entries)
    if values:
        description.sections["values"] = values
    generators = _generator_rows(entries, manifest, description.tensors)
    if generators:
        description.sections["random generators"] = generators
    description.notes.append("hashes are not checked here; `torchkeep verify` checks them")
    return description


def _sharded_section(path: Path, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """Layout, world size, shard files and chunk counts of a sharded step."""
    from .distributed.layout import RANK_PREFIX, read_sharded_state

    state = read_sharded_state(path, manifest)
    chunks: dict[str, int] = {}
    for tensor in state["tensors"].values():
        for chunk in tensor["chunks"]:
            chunks[chunk["file"]] = chunks.get(chunk["file"], 0) + 1
    shared = [k for k in state["tensors"] if not k.startswith(RANK_PREFIX)]
    return [
        ("layout", f"{manifest['layout']} (format version {manifest['format_version']})"),
        ("world size", str(state["world_size"])),
        ("ranks' files", ", ".join(f"{f}: {n} chunks" for f, n in sorted(chunks.items()))),
        ("tensors", f"{len(shared)} global, {len(state['tensors']) - len(shared)} per rank"),
    ]


def _describe_folder(path: Path) -> Description:
    steps = list_steps(path)
    if not steps:
        raise TorchkeepFileNotFoundError(f"{path} holds no committed checkpoint step")
    skipped: list[str] = []
    for info in reversed(steps):
        need(info.path)  # a remote folder's copy fetches this step now
        try:
            description = _describe_step(info.path)
        except CorruptFileError as exc:
            skipped.append(f"step {info.step} is unusable and was skipped: {first_line(exc)}")
            continue
        description.path, description.format = path, Format.CHECKPOINT_DIR
        description.size = sum(info.size for info in steps)
        description.sections["steps"] = [(str(i.step), _when(i.created)) for i in steps]
        description.notes[:0] = [
            *skipped,
            f"tensors and values are those of the latest step, {info.step}"
            + (" that could be read" if skipped else ""),
        ]
        return description
    raise CorruptFileError(f"{path}: no step is readable; {skipped[0]}")


DESCRIBERS[Format.CHECKPOINT_STEP] = _describe_step
DESCRIBERS[Format.CHECKPOINT_DIR] = _describe_folder
