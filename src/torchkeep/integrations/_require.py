"""The import guard every integration starts with."""

from __future__ import annotations

import importlib.util

from ..errors import missing_dependency


def require(package: str, *, extra: str, feature: str) -> None:
    """Raise :class:`~torchkeep.MissingDependencyError` unless ``package`` is installed.

    Only looks the package up (nothing is imported here); the integration module imports it
    afterwards by its fixed name.

    Raises:
        MissingDependencyError: naming ``feature`` and ``pip install 'torchkeep[<extra>]'``.
    """
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken parent package, or __spec__ unset
        found = False
    if not found:
        raise missing_dependency(package, extra, feature)
