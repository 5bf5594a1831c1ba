"""Pickle-free (de)serialisation of nested training state.

:func:`flatten` splits a nested value (an optimizer's ``state_dict()``, a scheduler's, RNG
states, user values) into a flat ``name -> tensor`` dict, stored with safetensors, and a JSON
*skeleton* holding everything else. Python types JSON cannot tell apart carry explicit tags, so
that :func:`unflatten` gives back exactly what went in: tuples stay tuples, ints stay ints,
``nan``/``inf`` survive, dtypes, devices, ``torch.Size`` and bytes come back as themselves, and
dicts keep their order and non-string keys (an optimizer's integer parameter ids);
``OrderedDict`` comes back as a plain dict.

A tagged node is a JSON object with one key starting with ``$``; a plain JSON object is a dict
whose keys are all strings not starting with ``$``. Reading a skeleton never executes anything.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CorruptFileError, UnsupportedValueError

Json = Any

_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Bounds of what can be stored, so that every state.json a reader accepts is also one a writer
# can produce: JSON nesting of a skeleton, and the size of integers.
MAX_DEPTH = 100
MAX_INT_BITS = 256
SUPPORTED = (
    "tensors, None, bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size, "
    "and lists, tuples and dicts of these"
)


@dataclass
class Flat:
    """A value split into a JSON skeleton and the tensors it refers to by name."""

    skeleton: Json
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _child(path: str, key: object) -> str:
    """``optimizer.state`` + ``3`` -> ``optimizer.state[3]``; string keys join with a dot."""
    if isinstance(key, str) and key and not key.startswith("["):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


class _Flattener:
    def __init__(self, root: str) -> None:
        self.root = root
        self.tensors: dict[str, torch.Tensor] = {}

    def _where(self, path: str) -> str:
        return _child(self.root, path) if path and self.root else path or self.root

    def _tensor_name(self, path: str) -> str:
        name = path or self.root or "value"
        unique, n = name, 1
        while unique in self.tensors:
            n += 1
            unique = f"{name}#{n}"
        return unique

    def encode(self, value: object, path: str, depth: int = 1) -> Json:
        """The JSON node of ``value``, which sits ``depth`` levels deep in the skeleton."""
        if value is None or isinstance(value, (bool, str)):
            return value
        if type(value) is int:
            if value.bit_length() > MAX_INT_BITS:
                raise UnsupportedValueError(
                    f"cannot save {self._where(path) or 'the value'}: an int of "
                    f"{value.bit_length()} bits is beyond the {MAX_INT_BITS}-bit limit of "
                    "stored ints; store it as a string (str(n)) or bytes"
                )
            return value
        if type(value) is float and math.isfinite(value):
            return value
        if depth > MAX_DEPTH - 2:  # every other node may open up to three levels
            raise UnsupportedValueError(
                f"cannot save {self._where(path) or 'the value'}: it is nested more than "
                f"{MAX_DEPTH} levels deep (or refers to itself); flatten the structure"
            )
        if type(value) is float:
            return {"$float": repr(value)}
        if isinstance(value, torch.Tensor):
            return self._encode_tensor(value, path)
        if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
            inner = depth + (1 if type(value) is list else 2)
            items = [self.encode(v, f"{path}[{i}]", inner) for i, v in enumerate(value)]
            return items if type(value) is list else {"$tuple": items}
        if isinstance(value, dict):  # OrderedDict and defaultdict come back as dict
            return self._encode_dict(value, path, depth)
        if isinstance(value, torch.Size):
            return {"$size": list(value)}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if type(value) is bytes:
            return {"$bytes": base64.b64encode(value).decode("ascii")}
        raise UnsupportedValueError(
            f"cannot save {self._where(path) or 'the value'}: a {type(value).__module__}."
            f"{type(value).__qualname__} is not one of the supported types ({SUPPORTED}). "
            "Convert it (e.g. .item(), .tolist(), torch.as_tensor(...)), or pass an object with "
            "state_dict()/load_state_dict() that returns supported values"
        )

    def _encode_tensor(self, tensor: torch.Tensor, path: str) -> Json:
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            raise UnsupportedValueError(
                f"cannot save {self._where(path)}: a {tensor.layout} tensor on {tensor.device} "
                "has no dense data; call .to_dense() (or materialise it) first"
            )
        name = self._tensor_name(path)
        self.tensors[name] = tensor.detach()
        return {"$tensor": name}

    def _encode_dict(self, value: dict[Any, Any], path: str, depth: int) -> Json:
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: self.encode(v, _child(path, k), depth + 1) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if isinstance(k, torch.Tensor):
                raise UnsupportedValueError(
                    f"cannot save {self._where(path)}: a tensor is used as a dict key; "
                    "use its .item() or an index instead"
                )
            pair = [self.encode(k, path, depth + 3), self.encode(v, _child(path, k), depth + 3)]
            items.append(pair)
        return {"$dict": items}


def flatten(value: object, *, root: str = "") -> Flat:
    """Split ``value`` into a JSON skeleton and a flat dict of its tensors.

    Tensors are named by their path in ``value`` (``state[0].exp_avg``); the names are unique.
    Tensors are detached but not copied.

    Args:
        value: a supported nested value (see :data:`SUPPORTED`).
        root: a name for ``value`` used only in error messages (``"optimizer"``).

    Returns:
        A :class:`Flat` with the skeleton and the tensors.

    Raises:
        UnsupportedValueError: naming the path of the first value that cannot be stored.

    Example:
        >>> flat = flatten(optimizer.state_dict(), root="optimizer")
        >>> sorted(flat.tensors)[:1]
        ['state[0].momentum_buffer']
    """
    flattener = _Flattener(root)
    skeleton = flattener.encode(value, "")
    return Flat(skeleton, flattener.tensors)


class _Unflattener:
    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        self.tensors = tensors
        self.source = source

    def _corrupt(self, problem: str) -> CorruptFileError:
        return CorruptFileError(
            f"{self.source}: {problem}. The file is damaged or was not written by torchkeep; "
            "restore another step (or run `torchkeep verify`)"
        )

    def decode(self, node: Json) -> object:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(item) for item in node]
        if not isinstance(node, dict):
            raise self._corrupt(f"unexpected JSON value {node!r}")
        if len(node) == 1:
            (tag, payload), *_ = node.items()
            if tag.startswith("$"):
                return self._decode_tagged(tag, payload)
        if any(k.startswith("$") for k in node):
            raise self._corrupt(f"object with reserved keys {sorted(node)}")
        return {k: self.decode(v) for k, v in node.items()}

    def _decode_tagged(self, tag: str, payload: Json) -> object:
        try:
            return self._decode_payload(tag, payload)
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
            if isinstance(exc, CorruptFileError):
                raise
            raise self._corrupt(f"bad {tag} entry {payload!r} ({exc})") from None

    def _decode_payload(self, tag: str, payload: Json) -> object:
        if tag == "$tensor":
            if payload not in self.tensors:
                raise self._corrupt(f"tensor {payload!r} is missing from the tensor file")
            return self.tensors[payload]
        if tag == "$tuple":
            return tuple(self.decode(item) for item in _list(payload))
        if tag == "$dict":
            result = {}
            for pair in _list(payload):
                key, val = _list(pair)
                result[self.decode(key)] = self.decode(val)
            return result
        if tag == "$float":
            return _SPECIAL_FLOATS[payload]
        if tag == "$size":
            return torch.Size([int(d) for d in _list(payload)])
        if tag == "$dtype":
            dtype = getattr(torch, str(payload), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError("not a torch dtype")
            return dtype
        if tag == "$device":
            return torch.device(str(payload))
        if tag == "$bytes":
            return base64.b64decode(str(payload), validate=True)
        raise self._corrupt(f"unknown tag {tag!r} (written by a newer torchkeep?)")


def _list(payload: Json) -> list[Any]:
    if not isinstance(payload, list):
        raise TypeError("expected a list")
    return payload


def unflatten(skeleton: Json, tensors: Mapping[str, torch.Tensor], *, source: str = "") -> Any:
    """Rebuild the value :func:`flatten` split, from its skeleton and tensors.

    Args:
        skeleton: the JSON skeleton (as parsed from ``state.json``).
        tensors: the tensors by name (as read from the safetensors file).
        source: where the skeleton came from, for error messages.

    Returns:
        The original nested value; tensors are the objects of ``tensors``.

    Raises:
        CorruptFileError: the skeleton is malformed or names a missing tensor.

    Example:
        >>> flat = flatten({"step": 3, "betas": (0.9, 0.99)})
        >>> unflatten(flat.skeleton, flat.tensors)
        {'step': 3, 'betas': (0.9, 0.99)}
    """
    return _Unflattener(tensors, source or "checkpoint state").decode(skeleton)
