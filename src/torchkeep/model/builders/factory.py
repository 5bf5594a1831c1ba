"""Builders for libraries that make models by name: ``factory(name, **kwargs)`` (timm,
torchvision). The recorded spec is ``{"model_name": name, "kwargs": {...}}``; pretrained
weights are never asked for, and keywords that would fetch or read files are refused."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import nn

from ...errors import InvalidDocumentError
from ...schema import Map, Object, Satisfies, Str
from .registry import Builder, Spec, import_library, refuse_keys

MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
"""A model name a factory is given: no ``:`` or ``/``, so never a Hub or file reference."""


@dataclass(frozen=True)
class Factory:
    """What differs between factory libraries.

    Attributes:
        name: the builder's name and the package imported (``"timm"``).
        install: what to ``pip install`` when the package is missing.
        module_prefix: the package its model classes live in (``"timm."``).
        forbidden: keyword arguments never passed on (they download or read files).
        describe: ``describe(library, model, init_args)``: the name and keyword arguments that
            rebuild ``model`` (``init_args`` are what the caller gave ``save_model``).
        known: ``known(library, name)``: whether the installed library has that model.
        create: ``create(library, name, kwargs)``: the model, without pretrained weights.
    """

    name: str
    install: str
    module_prefix: str
    forbidden: frozenset[str]
    describe: Callable[[ModuleType, nn.Module, Mapping[str, Any]], tuple[str, dict[str, Any]]]
    known: Callable[[ModuleType, str], bool]
    create: Callable[[ModuleType, str, Mapping[str, Any]], nn.Module]


def factory_builder(factory: Factory) -> Builder:
    """A :class:`Builder` for ``factory``'s library."""

    def library() -> ModuleType:
        return import_library(factory.name, factory.install)

    def matches(model: nn.Module) -> bool:
        return factory.name in sys.modules and type(model).__module__.startswith(
            factory.module_prefix
        )

    def record(model: nn.Module, init_args: Mapping[str, Any]) -> Spec:
        name, kwargs = factory.describe(library(), model, init_args)
        return {"model_name": name, "kwargs": kwargs}

    def build(spec: Spec) -> nn.Module:
        module = library()
        name = spec["model_name"]
        if not factory.known(module, name):
            raise InvalidDocumentError(
                f"the bundle's config.json: key 'builder.spec.model_name' is {name!r}, which "
                f"the installed {factory.name} {getattr(module, '__version__', '')} does not "
                f"have. Upgrade {factory.name}, or load the weights with tk.load_weights into a "
                "model you build"
            )
        return factory.create(module, name, spec["kwargs"])

    why = f"would make {factory.name} download weights or read a file"
    schema = Object(
        {
            "model_name": Str(max_len=128, pattern=MODEL_NAME),
            "kwargs": Satisfies(Map(max_len=64), refuse_keys(factory.forbidden, why)),
        },
        required=("model_name", "kwargs"),
    )
    return Builder(
        name=factory.name,
        matches=matches,
        record=record,
        build=build,
        schema=schema,
        class_prefix=factory.module_prefix,
    )
