"""``config.json`` of a model bundle, read and validated against its schema before any use.

Schema (every other key is ignored)::

    {"format_version": 1,                            # optional (torchkeep.format_versions)
     "class": "package.module.Class",               # an absolute class path (classpath.py)
     "init": {"args": [...], "kwargs": {str: ...}},  # tagged JSON (torchkeep.tree)
     "example_inputs": [{"shape": [int, ...], "dtype": "float32"}, ...],  # optional
     "builder": {"name": "transformers", "spec": {...}},   # optional (format version 2)
     "buffer_dtype": "bfloat16"}   # optional (format version 2)

``builder`` names the recipe that rebuilds a library's model (:mod:`.builders`); its ``spec`` is
tagged JSON, checked against that builder's own schema, and ``class`` must then lie inside the
builder's library (``transformers.`` for the transformers builder). ``buffer_dtype`` is the
dtype the model's floating non-persistent buffers were cast to after it was built
(``model.to(torch.bfloat16)``); a load casts them the same way.

Bounds: 16 MiB, 64 levels of nesting, 64 example inputs of at most 16 dimensions and 2**26
elements each; a builder's spec at most 1 MiB of JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, InvalidDocumentError
from ..format_versions import BUNDLE, check_version
from ..schema import (
    AnyValue,
    Array,
    Int,
    Limits,
    Map,
    Object,
    Satisfies,
    Str,
    load_json_document,
    validate,
)
from ..tree import MAX_INT_BITS
from .builders import registry
from .capture import decode
from .classpath import class_path_problem
from .layout import CONFIG_NAME

MAX_CONFIG_BYTES = 16 * 2**20
MAX_CONFIG_DEPTH = 64
MAX_INPUTS = 64
MAX_DIMS = 16
MAX_NUMEL = 2**26
MAX_SPEC_BYTES = 2**20
FIX = "re-save it with tk.save_model, or restore it from a copy"

DTYPES: dict[str, torch.dtype] = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}
"""Every dtype name torch defines (``"float32"``, ``"float"``, ``"int64"``, ...): the only names
an example input may give, so no other attribute of ``torch`` is ever looked up by a name read
from a file."""


@dataclass(frozen=True)
class BundleConfig:
    """A validated ``config.json``: the class path, the constructor arguments (as stored, and
    decoded) and the ``(shape, dtype)`` of each example input."""

    class_path: str
    init: dict[str, Any] = field(default_factory=dict)
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    example_inputs: list[tuple[list[int], torch.dtype]] = field(default_factory=list)
    builder: str | None = None
    spec: dict[str, Any] | None = None
    buffer_dtype: torch.dtype | None = None


def _class_problem(value: object) -> str | None:
    problem = class_path_problem(value)
    return None if problem is None else f"is not a valid class path: {problem}"


def _dtype_problem(name: str) -> str | None:
    return None if name in DTYPES else f"{name!r} is not a torch dtype (such as 'float32')"


def _numel_problem(shape: list[int]) -> str | None:
    numel = math.prod(shape)
    return None if numel <= MAX_NUMEL else f"has {numel} elements, more than {MAX_NUMEL}"


def _spec_size_problem(spec: dict[str, Any]) -> str | None:
    size = len(json.dumps(spec))
    return None if size <= MAX_SPEC_BYTES else f"has {size} bytes of JSON (limit {MAX_SPEC_BYTES})"


SCHEMA = Object(
    {
        "format_version": Int(min=1, max=1000),  # absent in bundles of torchkeep 0.1.0 and 0.2.0
        "class": Satisfies(AnyValue(), _class_problem),
        "init": Object({"args": Array(), "kwargs": Map()}),
        "example_inputs": Array(
            Object(
                {
                    "shape": Satisfies(
                        Array(Int(min=0, max=MAX_NUMEL), max_len=MAX_DIMS), _numel_problem
                    ),
                    "dtype": Satisfies(Str(max_len=32), _dtype_problem),
                },
                required=("shape", "dtype"),
            ),
            max_len=MAX_INPUTS,
        ),
        "buffer_dtype": Satisfies(Str(max_len=32), _dtype_problem),
        "builder": Object(
            {
                "name": Str(max_len=64, pattern=registry.NAME_PATTERN),
                "spec": Satisfies(Map(max_len=256), _spec_size_problem),
            },
            required=("name", "spec"),
        ),
    },
    required=("class", "init"),
)
"""``config.json`` (module doc); the constructor arguments are then decoded by
:func:`torchkeep.tree.unflatten`, which checks their tags."""


def _limits() -> Limits:
    return Limits(
        max_bytes=MAX_CONFIG_BYTES,
        max_depth=MAX_CONFIG_DEPTH,
        max_int_digits=len(str(2**MAX_INT_BITS)),  # what torchkeep.tree stores
    )


def decode_value(value: object, source: str) -> Any:
    """:func:`capture.decode` with its errors (and any raw one) as CorruptFileError."""
    try:
        return decode(value, source)
    except CorruptFileError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
        raise InvalidDocumentError(f"{source} is malformed ({exc}); {FIX}") from None


def _decoded(document: dict[str, Any], path: Path) -> BundleConfig:
    check_version(BUNDLE, document.get("format_version", 1), source=path)
    init = document["init"]
    args = decode_value(init.get("args", []), f"{path}: key 'init.args'")
    kwargs = decode_value(init.get("kwargs", {}), f"{path}: key 'init.kwargs'")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise InvalidDocumentError(
            f"{path}: key 'init': 'args' must decode to a list and 'kwargs' to an object; {FIX}"
        )
    inputs = [
        (list(spec["shape"]), DTYPES[spec["dtype"]]) for spec in document.get("example_inputs", [])
    ]
    builder, spec = _builder_record(document, path)
    cast = document.get("buffer_dtype")
    buffer_dtype = None if cast is None else DTYPES[cast]
    return BundleConfig(document["class"], init, args, kwargs, inputs, builder, spec, buffer_dtype)


def _builder_record(document: dict[str, Any], path: Path) -> tuple[str | None, Any]:
    """The builder's name and decoded spec, checked against that builder's schema when this
    process knows the builder (an unknown one is refused by :func:`load_model`)."""
    record = document.get("builder")
    if record is None:
        return None, None
    spec = decode_value(record["spec"], f"{path}: key 'builder.spec'")
    builder = registry.known(record["name"])
    if builder is not None:
        validate(spec, builder.schema, source=f"{path}: key 'builder.spec'", fix=FIX)
        prefix = builder.class_prefix
        if prefix is not None and not document["class"].startswith(prefix):
            raise InvalidDocumentError(
                f"{path}: key 'class' is {document['class']!r}, outside the {prefix!r} package "
                f"the {record['name']!r} builder rebuilds models from; {FIX}"
            )
    return record["name"], spec


def validate_config(document: object, path: Path) -> BundleConfig:
    """Check a parsed ``config.json`` against :data:`SCHEMA` and decode it.

    Raises:
        InvalidDocumentError: the message names the file, the key and the fix.
    """
    return _decoded(validate(document, SCHEMA, source=str(path), fix=FIX), path)


def read_config(folder: Path) -> BundleConfig:
    """Read ``folder/config.json`` through the bounded reader and validate it (``folder``: the
    folder holding a bundle's files, :func:`~torchkeep.model.layout.bundle_files`).

    Raises:
        InvalidDocumentError: the file is too large, too deep, not JSON, or breaks the schema.
        UnreadableFileError: it cannot be read.
        TorchkeepFileNotFoundError: it is missing.
    """
    path = folder / CONFIG_NAME
    document = load_json_document(path, schema=SCHEMA, limits=_limits(), fix=FIX)
    return _decoded(document, path)
