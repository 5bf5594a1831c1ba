"""Recording the arguments a model's ``__init__`` was called with, as JSON, so a bundle can
rebuild the model without pickling it."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import InitArgsError

_ATTRIBUTE = "_torchkeep_init_args"
_TUPLE_TAG = "__tuple__"
_DTYPE_TAG = "__dtype__"


class _Unstorable:
    """Stands in for an argument that cannot be stored, remembering why (raised at save time)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def encode(value: object, name: str) -> object:
    """Turn an argument into JSON (tuples, dtypes tagged); raise naming ``name`` if impossible."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.dtype):
        return {_DTYPE_TAG: str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        items = [encode(item, f"{name}[{i}]") for i, item in enumerate(value)]
        return {_TUPLE_TAG: items} if isinstance(value, tuple) else items
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise InitArgsError(f"argument {name!r} is a dict with non-string keys; JSON needs str")
        return {key: encode(item, f"{name}[{key!r}]") for key, item in value.items()}
    what = "an nn.Module" if isinstance(value, nn.Module) else f"a {type(value).__name__}"
    raise InitArgsError(
        f"argument {name!r} is {what}, which cannot be stored as JSON. Store plain values "
        "(numbers, strings, lists, dicts) and build the object inside __init__, or pass "
        "init_args= with JSON values to save_model"
    )


def decode(value: object) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(item) for item in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE_TAG}:
            return tuple(decode(item) for item in value[_TUPLE_TAG])
        if set(value) == {_DTYPE_TAG}:
            dtype = getattr(torch, str(value[_DTYPE_TAG]), None)
            if not isinstance(dtype, torch.dtype):
                raise InitArgsError(f"unknown dtype {value[_DTYPE_TAG]!r} in a bundle's config")
            return dtype
        if set(value) == {"__float__"}:
            return float(str(value["__float__"]))
        return {key: decode(item) for key, item in value.items()}
    return value


def _capture(
    init: Callable[..., None], self: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """Bind a call to ``init``'s signature and encode it (unstorable values are marked)."""
    try:
        bound = inspect.signature(init).bind(self, *args, **kwargs)
    except TypeError:
        return None  # the call itself is wrong: let __init__ raise its own error
    bound.apply_defaults()
    positional: list[object] = []
    named: dict[str, object] = {}
    for index, (name, param) in enumerate(bound.signature.parameters.items()):
        if index == 0:
            continue  # self
        value = bound.arguments[name]
        try:
            if param.kind == param.VAR_POSITIONAL:
                positional.extend(encode(v, f"*{name}[{i}]") for i, v in enumerate(value))
            elif param.kind == param.POSITIONAL_ONLY:
                positional.append(encode(value, name))
            elif param.kind == param.VAR_KEYWORD:
                named.update({k: encode(v, k) for k, v in value.items()})
            else:
                named[name] = encode(value, name)
        except InitArgsError as exc:
            return {"error": _Unstorable(str(exc))}
    return {"args": positional, "kwargs": named}


def _wrap_init(cls: type[nn.Module]) -> None:
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_torchkeep_wrapped", False):
        return

    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        if _ATTRIBUTE not in self.__dict__:
            captured = _capture(init, self, args, kwargs)
            if captured is not None:
                object.__setattr__(self, _ATTRIBUTE, captured)
        init(self, *args, **kwargs)

    __init__._torchkeep_wrapped = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__  # type: ignore[method-assign]


class Keepable:
    """Mixin that records the arguments ``__init__`` was called with, for :func:`save_model`.

    Put it before ``nn.Module`` in the bases; every subclass is covered too. Arguments must
    be JSON values (numbers, strings, ``None``, lists, tuples, dicts with string keys, torch
    dtypes); anything else, such as a nested ``nn.Module``, is reported by name when the
    model is saved.

    Example:
        >>> class Net(tk.Keepable, nn.Module):
        ...     def __init__(self, width: int = 64) -> None: ...
        >>> tk.save_model(Net(width=128), "net.bundle")  # config.json records width=128
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, nn.Module):
            _wrap_init(cls)


def captured_init_args(model: nn.Module) -> dict[str, Any] | None:
    """The recorded ``{"args": [...], "kwargs": {...}}`` of a model, or None if not recorded.

    Raises:
        InitArgsError: an argument could not be stored; the message names it.
    """
    recorded = model.__dict__.get(_ATTRIBUTE)
    if recorded is None:
        return None
    if "error" in recorded:
        raise InitArgsError(f"{type(model).__qualname__}: {recorded['error'].reason}")
    return dict(recorded)


def required_parameters(cls: type) -> list[str]:
    """Names of ``cls.__init__`` parameters that have no default."""
    init = cls.__dict__.get("__init__") or getattr(cls, "__init__")  # noqa: B009
    init = getattr(init, "__wrapped__", init)
    params = list(inspect.signature(init).parameters.values())[1:]
    return [
        p.name
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
