"""Builders: recipes that record how to rebuild a library's model (config objects, factories)
as data, with the built-in ones for ``transformers``, ``timm`` and ``torchvision``. None of
them imports its library until a model or bundle names it."""

from . import timm, torchvision, transformers
from .registry import Builder, add_builtin, builder_for, builder_named, register_builder

for _module in (transformers, timm, torchvision):
    add_builtin(_module.BUILDER)

__all__ = ["Builder", "builder_for", "builder_named", "register_builder"]
