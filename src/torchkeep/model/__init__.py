"""Whole models: pickle-free bundles, ``torch.export`` programs, init-argument capture."""

from . import describe as _describe  # noqa: F401  (registers the inspect describers)
from .builders import register_builder
from .bundle import load_model, register_alias, save_model
from .capture import Keepable
from .migrate import migrate_pickled_model

__all__ = [
    "Keepable",
    "load_model",
    "migrate_pickled_model",
    "register_alias",
    "register_builder",
    "save_model",
]
