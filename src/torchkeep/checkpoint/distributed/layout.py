"""The sharded-v1 step layout: file and key names, ``state.json`` schema and tensor index.

A sharded step holds one safetensors file per writing rank (``shard-00003-of-00004.safetensors``,
keys = the tensors' flat names, DCP's ``DCP_SHARDING_INFO`` in ``__metadata__``), ``state.json``
(entry skeletons, per-rank skeletons and the tensor index with every chunk's place and xxh3) and
``manifest.json`` (``format_version`` :data:`FORMAT_VERSION`, ``layout`` :data:`LAYOUT`,
``world_size``). Shard files are recorded in the manifest with a *segmented* hash (see
:mod:`.segments`) so that every byte is hashed once while it is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import InvalidDocumentError
from ...manifest import FILE_NAME_PATTERN
from ...schema import (
    AnyValue,
    Array,
    Equals,
    Int,
    Map,
    Object,
    OneOf,
    Str,
    load_json_document,
)
from ..layout import ENTRY_NAME_PATTERN, LAYOUT_VERSIONS, STATE_LIMITS, STATE_NAME

LAYOUT = "sharded-v1"
SINGLE_LAYOUT = "single"
# The checkpoint format version of a sharded step (defined with the other layouts' versions).
FORMAT_VERSION = LAYOUT_VERSIONS[LAYOUT]
# Prefix of the keys of per-rank tensors (RNG states, per_rank= entries): reserved for
# torchkeep, so no user entry can produce it.
RANK_PREFIX = "torchkeep.rank-"
MAX_WORLD_SIZE = 1 << 20

_INT_LIST = Array(Int(), max_len=64)
_CHUNK = Object(
    {
        "offsets": _INT_LIST,
        "sizes": _INT_LIST,
        "file": Str(max_len=255, pattern=FILE_NAME_PATTERN),
        "offset": Int(),
        "length": Int(),
        "hash": Str(max_len=128, pattern="[0-9a-f]+"),
    },
    required=("offsets", "sizes", "file", "offset", "length", "hash"),
)
_TENSOR = Object(
    {"dtype": Str(max_len=32), "shape": _INT_LIST, "chunks": Array(_CHUNK, max_len=1 << 16)},
    required=("dtype", "shape", "chunks"),
)
_ENTRY = Object(
    {
        "kind": OneOf((Equals("stateful"), Equals("value"))),
        "scope": OneOf((Equals("sharded"), Equals("replicated"), Equals("per_rank"))),
        "value": AnyValue(),
    },
    required=("kind", "scope", "value"),
)
_ENTRY_NAME = Str(max_len=200, pattern=ENTRY_NAME_PATTERN)
STATE_SCHEMA = Object(
    {
        "step": Int(),
        "layout": Equals(LAYOUT),
        "world_size": Int(min=1, max=MAX_WORLD_SIZE),
        "entries": Map(_ENTRY, key=_ENTRY_NAME, max_len=10_000),
        "ranks": Array(Map(AnyValue(), key=_ENTRY_NAME, max_len=10_000), max_len=MAX_WORLD_SIZE),
        "tensors": Map(_TENSOR, key=Str(max_len=4096), max_len=10_000_000),
    },
    required=("step", "layout", "world_size", "entries", "ranks", "tensors"),
)


def shard_name(rank: int, world_size: int) -> str:
    """The shard file written by ``rank`` of ``world_size``."""
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def tensor_key(entry: str, name: str) -> str:
    """The key of tensor ``name`` (a flat name inside the entry) of ``entry`` in DCP's flat
    state dict and in the shard files: ``model/layers.0.weight``."""
    return f"{entry}/{name}"


def rank_key(rank: int, entry: str, name: str) -> str:
    """The key of a per-rank tensor (``torchkeep.rank-00003/torchkeep.rng/torch``)."""
    return f"{RANK_PREFIX}{rank:05d}/{tensor_key(entry, name)}"


def is_sharded(manifest: Mapping[str, Any]) -> bool:
    """True when a checkpoint manifest describes a sharded step."""
    return manifest.get("layout") == LAYOUT


def read_sharded_state(path: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Read and check ``state.json`` of the sharded step at ``path`` (its hash was verified).

    Beyond the schema: the step and world size agree with the manifest, there is one rank
    record per rank, and every chunk lies in a file the manifest lists.

    Raises:
        CorruptFileError: the document is unreadable or invalid (the step is skipped).
    """
    source = path / STATE_NAME
    state: dict[str, Any] = load_json_document(source, schema=STATE_SCHEMA, limits=STATE_LIMITS)
    problem = None
    if state["step"] != manifest["step"] or state["world_size"] != manifest.get("world_size"):
        problem = "records another step or world size than its manifest"
    elif len(state["ranks"]) != state["world_size"]:
        problem = f"has {len(state['ranks'])} rank records for {state['world_size']} ranks"
    else:
        files = manifest["files"]
        for key, tensor in state["tensors"].items():
            for chunk in tensor["chunks"]:
                if chunk["file"] not in files:
                    problem = f"places a chunk of {key!r} in {chunk['file']!r}, not listed"
                    break
                if chunk["offset"] + chunk["length"] > files[chunk["file"]]["size"]:
                    problem = f"places a chunk of {key!r} past the end of {chunk['file']!r}"
                    break
            if problem:
                break
    if problem:
        raise InvalidDocumentError(f"{source} {problem}; the step is damaged, so it is skipped")
    return state
