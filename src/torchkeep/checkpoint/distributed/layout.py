"""The sharded-v1 step layout: file and key names, ``state.json`` schema and tensor index.

A sharded step holds one safetensors file per writing rank (``shard-00003-of-00004.safetensors``,
keys = the tensors' flat names, DCP's ``DCP_SHARDING_INFO`` in ``__metadata__``), ``state.json``
(entry skeletons, per-rank skeletons and the tensor index with every chunk's place and xxh3) and
``manifest.json`` (``format_version`` :data:`FORMAT_VERSION`, ``layout`` :data:`LAYOUT`,
``world_size``). Shard files are recorded in the manifest with a *segmented* hash (see
:mod:`.segments`) so that every byte is hashed once while it is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ...errors import InvalidDocumentError
from ...manifest import FILE_NAME_PATTERN, files_folder
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
DTYPES = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}
"""The dtypes a tensor of ``state.json`` may have, by name."""
MAX_CHUNK_COMPARISONS = 1 << 22
"""Chunk pairs compared per tensor to prove its chunks do not overlap (geometry_problem)."""

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
    source = files_folder(path, manifest) / STATE_NAME
    state: dict[str, Any] = load_json_document(source, schema=STATE_SCHEMA, limits=STATE_LIMITS)
    problem = None
    if state["step"] != manifest["step"] or state["world_size"] != manifest.get("world_size"):
        problem = "records another step or world size than its manifest"
    elif len(state["ranks"]) != state["world_size"]:
        problem = f"has {len(state['ranks'])} rank records for {state['world_size']} ranks"
    else:
        problem = _index_problem(state["tensors"], manifest["files"])
    if problem:
        raise InvalidDocumentError(f"{source} {problem}; the step is damaged, so it is skipped")
    return state


def _index_problem(tensors: Mapping[str, Any], files: Mapping[str, Any]) -> str | None:
    """What makes the tensor index unusable, or None.

    Every chunk lies in a listed file and holds exactly the bytes its sizes and dtype need,
    the chunks tile their tensor (see :func:`geometry_problem`), and together they hold no
    more bytes than the listed shard files: what a reader allocates from the index is bounded by
    what is stored, and no part of a tensor is left unfilled by stored bytes (a zero-length
    chunk of any size, a shape larger than its chunks, overlapping chunks).
    """
    shards = {name: record for name, record in files.items() if name != STATE_NAME}
    stored = sum(record["size"] for record in shards.values())
    total = 0
    for key, tensor in tensors.items():
        dtype = DTYPES.get(tensor["dtype"])
        if dtype is None:
            return f"gives {key!r} the unknown dtype {tensor['dtype'][:32]!r}"
        for i, chunk in enumerate(tensor["chunks"]):
            where = f"chunk {i} of {key!r}"
            if chunk["file"] not in shards:
                return f"places {where} in {chunk['file']!r}, not a listed shard"
            if chunk["offset"] + chunk["length"] > shards[chunk["file"]]["size"]:
                return f"places {where} past the end of {chunk['file']!r}"
            volume = math.prod(chunk["sizes"])
            if chunk["length"] != volume * dtype.itemsize:
                return f"gives {where} {chunk['length']} bytes for {volume} {dtype} elements"
            total += chunk["length"]
        boxes = [(chunk["offsets"], chunk["sizes"]) for chunk in tensor["chunks"]]
        problem = geometry_problem(tensor["shape"], boxes)
        if problem is not None:
            return f"gives {key!r} {problem}"
    if total > stored:
        return f"has chunks of {total} bytes in all, more than the {stored} bytes of its files"
    return None


def geometry_problem(
    shape: Sequence[int], chunks: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> str | None:
    """Why the ``(offsets, sizes)`` boxes ``chunks`` do not tile a tensor of ``shape`` exactly
    once, or None when they do (every dimension non-negative, every box inside the shape, the
    boxes' elements adding up to the shape's and no two boxes overlapping).

    A sweep along the dimension with the most distinct chunk starts compares only chunks whose
    ranges meet there (N chunks cost N times the chunks per slab: 4096 ranks in a 64 x 64 mesh
    about 260,000 comparisons, a one-dimensional sharding N); a layout that would need
    more than :data:`MAX_CHUNK_COMPARISONS` is refused.
    """
    if any(d < 0 for d in shape):
        return f"a negative dimension in shape {list(shape)}"
    elements = 0
    for i, (offsets, sizes) in enumerate(chunks):
        if not len(offsets) == len(sizes) == len(shape):
            return f"chunk {i} of {len(offsets)} offsets, {len(sizes)} sizes for {list(shape)}"
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            return f"chunk {i} outside its shape {list(shape)}"
        elements += math.prod(sizes)
    if elements != math.prod(shape):
        return f"chunks of {elements} elements for shape {list(shape)}"
    boxes = [(i, list(o), list(s)) for i, (o, s) in enumerate(chunks) if all(s)]
    if len(boxes) < 2:
        return None
    if not shape:
        return f"overlapping chunks {boxes[0][0]} and {boxes[1][0]}"
    axis = max(range(len(shape)), key=lambda d: len({offsets[d] for _, offsets, _ in boxes}))
    boxes.sort(key=lambda box: box[1][axis])
    active: list[tuple[int, list[int], list[int]]] = []
    budget = MAX_CHUNK_COMPARISONS
    for box in boxes:
        start = box[1][axis]
        active = [a for a in active if a[1][axis] + a[2][axis] > start]
        budget -= len(active)
        if budget < 0:
            return f"more than {MAX_CHUNK_COMPARISONS} chunk pairs to compare"
        for other in active:
            if all(
                max(o1, o2) < min(o1 + s1, o2 + s2)
                for o1, s1, o2, s2 in zip(box[1], box[2], other[1], other[2], strict=True)
            ):
                return f"overlapping chunks {other[0]} and {box[0]}"
        active.append(box)
    return None
