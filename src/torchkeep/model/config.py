"""``config.json`` of a model bundle, read and validated against its schema before any use.

Schema (every other key is ignored)::

    {"class": "package.module.Class",               # an absolute class path (classpath.py)
     "init": {"args": [...], "kwargs": {str: ...}},  # tagged JSON (torchkeep.tree)
     "example_inputs": [{"shape": [int, ...], "dtype": "float32"}, ...]}   # optional

Bounds: 16 MiB, 64 levels of nesting, 64 example inputs of at most 16 dimensions and 2**26
elements each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError
from ..formats.jsondoc import read_json_document
from .capture import decode
from .classpath import class_path_problem
from .layout import CONFIG_NAME

MAX_CONFIG_BYTES = 16 * 2**20
MAX_CONFIG_DEPTH = 64
MAX_INPUTS = 64
MAX_DIMS = 16
MAX_NUMEL = 2**26


@dataclass(frozen=True)
class BundleConfig:
    """A validated ``config.json``: the class path, the constructor arguments (as stored, and
    decoded) and the ``(shape, dtype name)`` of each example input."""

    class_path: str
    init: dict[str, Any] = field(default_factory=dict)
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    example_inputs: list[tuple[list[int], str]] = field(default_factory=list)


class _Invalid(Exception):
    """A schema violation at ``key``; turned into a CorruptFileError naming the file."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key, self.problem = key, problem


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dtype_name(value: object, key: str) -> str:
    if not (isinstance(value, str) and value.isidentifier() and len(value) <= 32):
        raise _Invalid(key, f"must be a torch dtype name such as 'float32', not {value!r:.40}")
    if not isinstance(getattr(torch, value, None), torch.dtype):
        raise _Invalid(key, f"{value!r} is not a torch dtype")
    return value


def _shape(value: object, key: str) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise _Invalid(key, f"must be a list of at most {MAX_DIMS} sizes")
    for index, size in enumerate(value):
        if not _is_int(size) or not 0 <= size <= MAX_NUMEL:
            raise _Invalid(f"{key}[{index}]", f"must be an integer from 0 to {MAX_NUMEL}")
    if math.prod(value) > MAX_NUMEL:
        raise _Invalid(key, f"has {math.prod(value)} elements, more than {MAX_NUMEL}")
    return list(value)


def _example_inputs(value: object) -> list[tuple[list[int], str]]:
    if not isinstance(value, list) or len(value) > MAX_INPUTS:
        raise _Invalid("example_inputs", f"must be a list of at most {MAX_INPUTS} entries")
    specs = []
    for index, spec in enumerate(value):
        key = f"example_inputs[{index}]"
        if not isinstance(spec, dict):
            raise _Invalid(key, "must be an object with 'shape' and 'dtype'")
        specs.append((_shape(spec.get("shape"), f"{key}.shape"),
                      _dtype_name(spec.get("dtype"), f"{key}.dtype")))  # fmt: skip
    return specs


def _init(value: object, source: str) -> tuple[list[Any], dict[str, Any]]:
    if not isinstance(value, dict):
        raise _Invalid("init", "must be an object with 'args' and 'kwargs'")
    args, kwargs = value.get("args", []), value.get("kwargs", {})
    if not isinstance(args, list):
        raise _Invalid("init.args", "must be a list")
    if not isinstance(kwargs, dict):
        raise _Invalid("init.kwargs", "must be an object")
    decoded_args = decode_value(args, f"{source}: key 'init.args'")
    decoded_kwargs = decode_value(kwargs, f"{source}: key 'init.kwargs'")
    if not isinstance(decoded_args, list) or not isinstance(decoded_kwargs, dict):
        raise _Invalid("init", "'args' must decode to a list and 'kwargs' to an object")
    return decoded_args, decoded_kwargs


def decode_value(value: object, source: str) -> Any:
    """:func:`capture.decode` with its errors (and any raw one) as CorruptFileError."""
    try:
        return decode(value, source)
    except CorruptFileError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
        raise CorruptFileError(f"{source} is malformed ({exc}); re-save the bundle") from None


def validate_config(document: object, path: Path) -> BundleConfig:
    """Check a parsed ``config.json`` against the schema (module doc) and decode it.

    Raises:
        CorruptFileError: the message names the file, the key and the fix.
    """
    try:
        if not isinstance(document, dict):
            raise _Invalid("(top level)", f"must be an object, not a {type(document).__name__}")
        if "class" not in document or "init" not in document:
            raise _Invalid("class" if "class" not in document else "init", "is missing")
        problem = class_path_problem(document["class"])
        if problem is not None:
            raise _Invalid("class", f"is not a valid class path: {problem}")
        args, kwargs = _init(document["init"], str(path))
        inputs = _example_inputs(document.get("example_inputs", []))
    except _Invalid as exc:
        raise CorruptFileError(
            f"{path}: key {exc.key!r} {exc.problem}. The bundle is damaged or hostile: re-save "
            "it with tk.save_model, or restore it from a copy"
        ) from None
    return BundleConfig(document["class"], document["init"], args, kwargs, inputs)


def read_config(bundle: Path) -> BundleConfig:
    """Read ``bundle/config.json`` with bounded size and depth, and validate it.

    Raises:
        CorruptFileError: the file is too large, too deep, not JSON, or breaks the schema.
        TorchkeepFileNotFoundError: the file is missing.
    """
    path = bundle / CONFIG_NAME
    document = read_json_document(
        path, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH, what="a bundle's config"
    )
    return validate_config(document, path)
