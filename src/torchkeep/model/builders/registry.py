"""The builder registry: recipes that record how to rebuild a library's model as JSON data.

A model built from a config object (``transformers``) or by a factory (``timm.create_model``,
``torchvision.models.get_model``) has no constructor arguments torchkeep could record. A
*builder* recognises such a model, describes it as JSON (the ``spec``, stored in the bundle's
``config.json``) and rebuilds it from that JSON. The built-in builders import their library
only when a model or bundle names it; user recipes are added with :func:`register_builder`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import nn

from ...errors import InvalidDocumentError, MissingDependencyError
from ...schema import Map, Schema

NAME_PATTERN = r"[a-z][a-z0-9_.\-]{0,63}"
"""A builder's name: lowercase, like a package name (``"transformers"``, ``"mylib"``)."""

Spec = dict[str, Any]
ANY_SPEC: Schema = Map(max_len=256)
"""The schema of a user builder's spec: an object (bounded like every config.json)."""


@dataclass(frozen=True)
class Builder:
    """A recipe for one library's models. See :func:`register_builder` for the fields."""

    name: str
    matches: Callable[[nn.Module], bool]
    record: Callable[[nn.Module, Mapping[str, Any]], Spec]
    build: Callable[[Spec], nn.Module]
    tie: Callable[[nn.Module], None] | None = None
    schema: Schema = ANY_SPEC
    class_prefix: str | None = None


_BUILDERS: dict[str, Builder] = {}
_BUILTIN: dict[str, Builder] = {}


def register_builder(
    name: str,
    *,
    matches: Callable[[nn.Module], bool],
    record: Callable[[nn.Module, Mapping[str, Any]], Spec],
    build: Callable[[Spec], nn.Module],
    tie: Callable[[nn.Module], None] | None = None,
) -> None:
    """Teach :func:`save_model`/:func:`load_model` to rebuild another library's models.

    ``save_model`` asks every registered builder (yours first, newest first, then the built-in
    ``transformers``, ``timm`` and ``torchvision`` ones) whether it ``matches`` the model; the
    first that does ``record``\\ s it as a JSON ``spec`` stored in ``config.json`` under
    ``builder``. Before writing, the bundle is rebuilt from that spec (weights on the meta
    device) and compared with the model, so a recipe that would not rebuild it is refused. In
    the loading process the same name must be registered: ``build(spec)`` makes the model
    (its parameters are kept on the meta device while it runs, so initialisers cost nothing),
    the weights are read into it, then ``tie(model)`` re-ties shared weights if given.

    Args:
        name: the name stored in bundles (lowercase letters, digits, ``_.-``), e.g. ``"mylib"``.
        matches: ``matches(model)`` is True for models this recipe describes.
        record: ``record(model, init_args)`` returns the spec: a dict of JSON values (numbers,
            strings, lists, dicts, ...); ``init_args`` are the ``init_args=`` given to
            ``save_model`` (empty if none), e.g. factory keyword arguments.
        build: ``build(spec)`` returns the model, built from installed code only.
        tie: called after the weights are loaded (e.g. ``lambda m: m.tie_weights()``).

    Raises:
        ValueError: ``name`` is not a valid builder name or is a built-in builder's.

    Example:
        >>> tk.register_builder(
        ...     "mylib",
        ...     matches=lambda m: type(m).__module__.startswith("mylib."),
        ...     record=lambda m, init_args: {"name": m.arch_name, "kwargs": dict(init_args)},
        ...     build=lambda spec: mylib.create(spec["name"], **spec["kwargs"]),
        ... )
    """
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(
            f"builder name {name!r:.80} is not valid: use 1 to 64 lowercase letters, digits, "
            "'_', '.' or '-', starting with a letter (like a package name)"
        )
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in builder's name; register yours under another")
    _BUILDERS.pop(name, None)
    _BUILDERS[name] = Builder(name, matches, record, build, tie)


def add_builtin(builder: Builder) -> None:
    """Register one of torchkeep's own builders (at import, by the adapters' package)."""
    _BUILTIN[builder.name] = builder


def builder_for(model: nn.Module) -> Builder | None:
    """The builder that describes ``model``: the newest user builder that matches, then the
    built-in ones; None when none does (the model is saved by its class and arguments)."""
    for builder in [*reversed(_BUILDERS.values()), *_BUILTIN.values()]:
        if builder.matches(model):
            return builder
    return None


def known_names() -> list[str]:
    """The names of every builder this process can load bundles with."""
    return sorted({*_BUILDERS, *_BUILTIN})


def known(name: str) -> Builder | None:
    """The builder registered under ``name`` (a user builder first), or None."""
    return _BUILDERS.get(name) or _BUILTIN.get(name)


def builder_named(name: str, source: str) -> Builder:
    """The builder a bundle names (a user builder takes precedence over a built-in one).

    Raises:
        InvalidDocumentError: no builder of that name is registered in this process.
    """
    builder = known(name)
    if builder is None:
        raise InvalidDocumentError(
            f"{source}: key 'builder.name' names builder {name!r:.80}, which this process does "
            f"not know (known: {', '.join(known_names())}). If the bundle came from your own "
            "recipe, call tk.register_builder with that name before loading it; otherwise the "
            "bundle was not written by torchkeep"
        )
    return builder


def import_library(package: str, install: str) -> ModuleType:
    """Import an installed library a built-in builder needs (``package`` is one of torchkeep's
    fixed names, never one read from a file).

    Raises:
        MissingDependencyError: it is not installed (or fails to import); the message says
            what to install.
    """
    try:
        return importlib.import_module(package)
    except Exception as exc:
        raise MissingDependencyError(
            f"this model bundle is rebuilt with {package!r}, which cannot be imported "
            f"({type(exc).__name__}: {str(exc)[:200]}). Install it with: pip install {install}"
        ) from exc


def refuse_keys(forbidden: frozenset[str], why: str) -> Callable[[Mapping[str, Any]], str | None]:
    """A schema rule (for :class:`~torchkeep.schema.Satisfies`) refusing ``forbidden`` keys,
    saying ``why``."""

    def problem(value: Mapping[str, Any]) -> str | None:
        found = sorted(forbidden.intersection(value))
        return f"holds {', '.join(map(repr, found))}, which {why}" if found else None

    return problem
