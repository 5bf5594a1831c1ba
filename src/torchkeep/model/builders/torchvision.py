"""Builder for ``torchvision`` models: ``torchvision.models.get_model(name, weights=None,
**kwargs)``.

torchvision does not remember which name built a model, so the name is found by rebuilding:
each registered name whose builder lives in the model's class's module is built (weights on
the meta device) and the first whose weights match the model's names and shapes is recorded.
Keywords such as ``num_classes`` are the ``init_args`` given to ``save_model``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from types import ModuleType
from typing import Any

from torch import nn

from ...errors import InitArgsError
from .construct import build_without_init, rebuild_problems
from .factory import Factory, factory_builder

FORBIDDEN = frozenset({"weights", "weights_backbone", "progress"})


def _create(library: ModuleType, name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    model: nn.Module = library.models.get_model(name, weights=None, **kwargs)
    return model


def _describe(
    library: ModuleType, model: nn.Module, init_args: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    models = library.models
    module = type(model).__module__
    names = models.list_models()
    candidates = [n for n in names if models.get_model_builder(n).__module__ == module]
    for name in candidates:
        try:
            rebuilt = build_without_init(partial(_create, library, name, init_args))
        except Exception:
            continue  # this name does not take these arguments
        if type(rebuilt) is type(model) and not rebuild_problems(model, rebuilt):
            return name, dict(init_args)
    raise InitArgsError(
        f"no torchvision model name ({', '.join(candidates) or 'none'} were tried) rebuilds "
        f"this {type(model).__qualname__} with init_args={dict(init_args)!r}. Pass the "
        "keywords it was built with, e.g. init_args={'num_classes': 10}"
    )


def _known(library: ModuleType, name: str) -> bool:
    return name in library.models.list_models()


BUILDER = factory_builder(
    Factory(
        name="torchvision",
        install="torchvision",
        module_prefix="torchvision.models.",
        forbidden=FORBIDDEN,
        describe=_describe,
        known=_known,
        create=_create,
    )
)
