"""Recording the arguments a model's ``__init__`` was called with, as JSON, so a bundle can
rebuild the model without pickling it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import tree
from ..errors import InitArgsError, InvalidDocumentError, UnsupportedValueError
from ..schema import validate
from .builders import transformers as hf

_ATTRIBUTE = "_torchkeep_init_args"
CONFIG_TAG = "$config"
"""Tags a constructor argument that is a library config object (a transformers
``PretrainedConfig``), stored as its spec: ``{"$config": {"model_type": ..., "config": ...}}``."""


@dataclass(frozen=True)
class LibraryConfig:
    """A config object recorded as a constructor argument, validated but not yet made (making
    it imports the library; :func:`resolve` does, after the model's class was located)."""

    spec: dict[str, Any]


class _Unstorable:
    """Stands in for an argument that cannot be stored, remembering why (raised at save time)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def encode(value: object, name: str) -> object:
    """An argument as tagged JSON (see :mod:`torchkeep.tree`); raise naming ``name`` if not."""
    if isinstance(value, nn.Module):
        raise InitArgsError(
            f"argument {name!r} is an nn.Module, which cannot be stored as JSON. Pass its "
            "settings (numbers, strings, lists, dicts) and build the module inside __init__, or "
            "pass init_args= with JSON values to save_model"
        )
    config = hf.config_value(value)
    if config is not None:
        return {CONFIG_TAG: tree.flatten(config, root=name).skeleton}
    try:
        flat = tree.flatten(value, root=name)
    except UnsupportedValueError as exc:
        raise InitArgsError(f"argument {name!r} cannot be stored: {exc}") from None
    if flat.tensors:
        raise InitArgsError(
            f"argument {name!r} holds a tensor; constructor arguments are stored as JSON, so "
            "pass sizes or plain values and register tensors as parameters or buffers"
        )
    return flat.skeleton


def decode(value: object, source: str = "a bundle's config.json") -> Any:
    """Inverse of :func:`encode`; a malformed value raises ``CorruptFileError`` naming
    ``source``. A recorded config object comes back as a :class:`LibraryConfig` (an argument,
    or an entry of a list or object of arguments)."""
    if isinstance(value, dict) and set(value) == {CONFIG_TAG}:
        spec = tree.unflatten(value[CONFIG_TAG], {}, source=source)
        validate(spec, hf.CONFIG_SCHEMA, source=source, fix="re-save it with tk.save_model")
        return LibraryConfig(spec)
    if isinstance(value, list) and any(_is_config(v) for v in value):
        return [decode(v, f"{source}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and any(_is_config(v) for v in value.values()):
        if any(str(k).startswith("$") for k in value):
            raise InvalidDocumentError(f"{source}: recorded arguments hold a tagged key")
        return {k: decode(v, f"{source}.{k}") for k, v in value.items()}
    return tree.unflatten(value, {}, source=source)


def _is_config(value: object) -> bool:
    return isinstance(value, dict) and set(value) == {CONFIG_TAG}


def holds_config(value: object) -> bool:
    """Whether recorded arguments hold a config object (the bundle is then format version 2:
    older torchkeep cannot decode it)."""
    if isinstance(value, list):
        return any(_is_config(v) for v in value)
    return isinstance(value, dict) and any(_is_config(v) for v in value.values())


def resolve(value: Any) -> Any:
    """``value``, with a :class:`LibraryConfig` made into its config object (this imports the
    library it names, which must be installed)."""
    return hf.make_config(value.spec) if isinstance(value, LibraryConfig) else value


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
    """Record the arguments of ``cls``'s ``__init__``: its own, or the one it inherits (so
    ``class Mine(tk.Keepable, Base): pass`` records ``Base``'s arguments)."""
    init = cls.__dict__.get("__init__") or cls.__init__
    if getattr(init, "_torchkeep_wrapped", False):
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

    Put it before ``nn.Module`` (or the model class you derive from) in the bases; every
    subclass is covered too, and a class without its own ``__init__`` records the arguments of
    the one it inherits (``class Mine(tk.Keepable, Base): pass``). Arguments must
    be values :mod:`torchkeep.tree` stores as JSON (numbers, strings, ``None``, bytes, lists,
    tuples, dicts, torch dtypes, devices and sizes); anything else, such as a nested
    ``nn.Module`` or a tensor, is reported by name when the model is saved.

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
