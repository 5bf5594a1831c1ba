"""Hyper-parameters as data: ``argparse.Namespace`` and dataclasses stored without pickle.

Users hand Lightning whatever their scripts hold: a ``Namespace`` from ``argparse``, a config
dataclass, nested in dicts and lists. :func:`encode` turns those into tagged dicts that
:mod:`torchkeep.tree` stores, and refuses (or, when asked, drops) every other value it cannot
store, naming its path, before anything is written. :func:`decode` turns the tags back:
a ``Namespace`` always; a dataclass only when its class is already imported (it is looked up
in ``sys.modules``, never imported) and rebuilt field by field without running its
``__init__``; otherwise its fields come back as a dict, with a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from .. import tree
from ..errors import UnsupportedValueError

TAG = "torchkeep.hparams"
_NAMESPACE = "argparse.Namespace"
_DATACLASS = "dataclass"
_DICT = "dict"  # a user dict that itself holds the key TAG, stored escaped

Policy = Literal["strict", "drop"]
_DROPPED = object()


def _storable(value: object) -> bool:
    try:
        tree.flatten(value)
    except UnsupportedValueError:
        return False
    return True


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class _Encoder:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.dropped: list[str] = []

    def encode(self, value: Any, path: str) -> Any:
        if isinstance(value, argparse.Namespace):
            return {TAG: _NAMESPACE, "fields": self._mapping(vars(value), path)}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return {
                TAG: _DATACLASS,
                "class": _class_path(type(value)),
                "fields": self._mapping(fields, path),
            }
        if isinstance(value, Mapping) and not isinstance(value, dict):
            value = dict(value)
        if isinstance(value, dict):
            encoded = self._mapping(value, path)
            return {TAG: _DICT, "fields": encoded} if TAG in value else encoded
        if type(value) in (list, tuple):
            items = [self.encode(item, f"{path}[{i}]") for i, item in enumerate(value)]
            kept = [item for item in items if item is not _DROPPED]
            return kept if type(value) is list else tuple(kept)
        if _storable(value):
            return value
        if self.policy == "drop":
            self.dropped.append(f"{path} ({type(value).__qualname__})")
            return _DROPPED
        raise UnsupportedValueError(
            f"cannot save {path}: a {type(value).__module__}.{type(value).__qualname__} is not "
            f"storable without pickle ({tree.SUPPORTED}, argparse.Namespace and dataclasses "
            "are). Store a plain value instead (a str, a number, a dict), or pass "
            "TorchkeepCheckpointIO(hparams='drop') to leave such values out with a warning"
        )

    def _mapping(self, value: Mapping[Any, Any], path: str) -> dict[Any, Any]:
        result = {}
        for key, item in value.items():
            child = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key!r}]"
            encoded = self.encode(item, child)
            if encoded is not _DROPPED:
                result[key] = encoded
        return result


def encode(value: Any, *, root: str, policy: Policy = "strict") -> Any:
    """``value`` with every Namespace and dataclass turned into a tagged dict.

    Args:
        value: the hyper-parameters (any nesting of dicts, lists and tuples).
        root: the name of ``value`` in messages (``"hyper_parameters"``).
        policy: ``"strict"`` refuses a value that cannot be stored; ``"drop"`` leaves it out
            and warns once, naming every path dropped.

    Raises:
        UnsupportedValueError: (``"strict"``) naming the path of the first such value.
    """
    encoder = _Encoder(policy)
    result = encoder.encode(value, root)
    if encoder.dropped:
        warnings.warn(
            "hyper-parameters that cannot be stored without pickle were left out of the "
            f"checkpoint: {', '.join(encoder.dropped)}",
            stacklevel=3,
        )
    return {} if result is _DROPPED else result


def _find_class(path: object) -> type | None:
    """The dataclass ``module:qualname`` names, if its module is already imported."""
    if not isinstance(path, str) or ":" not in path:
        return None
    module_name, _, qualname = path.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if obj is None or part.startswith("__"):
            return None
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        return obj
    return None


def _rebuild(cls: type, fields: dict[str, Any]) -> Any:
    """An instance of the dataclass ``cls`` holding ``fields``, without running its code."""
    names = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != names:
        return None
    instance: Any = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(instance, name, value)  # frozen dataclasses too
    return instance


def decode(value: Any) -> Any:
    """The inverse of :func:`encode` (see the module docstring for dataclasses)."""
    if isinstance(value, list):
        return [decode(item) for item in value]
    if isinstance(value, tuple):
        return tuple(decode(item) for item in value)
    if not isinstance(value, dict):
        return value
    kind = value.get(TAG)
    if kind is None or not isinstance(value.get("fields"), dict):
        return {key: decode(item) for key, item in value.items()}
    fields = {key: decode(item) for key, item in value["fields"].items()}
    if kind == _NAMESPACE:
        return argparse.Namespace(**{str(k): v for k, v in fields.items()})
    if kind == _DATACLASS:
        cls = _find_class(value.get("class"))
        rebuilt = _rebuild(cls, fields) if cls is not None else None
        if rebuilt is not None:
            return rebuilt
        warnings.warn(
            f"the hyper-parameter dataclass {value.get('class')!r} is not imported (or its "
            "fields changed); its fields are returned as a dict. Import its module before "
            "loading to get the dataclass back",
            stacklevel=2,
        )
    return fields
