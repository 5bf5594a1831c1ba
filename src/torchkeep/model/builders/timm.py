"""Builder for ``timm`` models: ``timm.create_model(name, pretrained=False, **kwargs)``.

The name is the model's ``pretrained_cfg["architecture"]``; ``num_classes`` is recorded from
the model, other keywords (``in_chans``, ``drop_rate``, ...) are the ``init_args`` given to
``save_model`` (the rebuild check says when one is needed).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from torch import nn

from ...errors import InitArgsError
from .factory import Factory, factory_builder

FORBIDDEN = frozenset(
    {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}
)


def _describe(
    library: ModuleType, model: nn.Module, init_args: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = config.get("architecture") if isinstance(config, Mapping) else None
    if not isinstance(name, str):
        raise InitArgsError(
            f"{type(model).__qualname__} has no pretrained_cfg['architecture'], so the timm "
            "model name that rebuilds it is unknown; build it with timm.create_model"
        )
    kwargs = dict(init_args)
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        kwargs.setdefault("num_classes", num_classes)
    return name, kwargs


def _known(library: ModuleType, name: str) -> bool:
    return bool(library.is_model(name.partition(".")[0]))


def _create(library: ModuleType, name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    model: nn.Module = library.create_model(name, pretrained=False, **kwargs)
    return model


BUILDER = factory_builder(
    Factory(
        name="timm",
        install="timm",
        module_prefix="timm.",
        forbidden=FORBIDDEN,
        describe=_describe,
        known=_known,
        create=_create,
    )
)
