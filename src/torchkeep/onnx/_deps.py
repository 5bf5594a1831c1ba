"""The optional ONNX packages, imported only when an ONNX feature is used."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import missing_dependency

EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def require(*packages: str, feature: str) -> list[ModuleType]:
    """Import ``packages`` (absolute names) or raise the error that gives the install command.

    Args:
        packages: top-level package names, e.g. ``"onnx"``.
        feature: what needs them, for the message (``"ONNX export"``).

    Returns:
        The imported modules, in the order asked.

    Example:
        >>> (onnx,) = require("onnx", feature="inspecting an ONNX file")
    """
    modules = []
    for package in packages:
        try:
            modules.append(importlib.import_module(package))
        except ImportError as exc:
            raise missing_dependency(package, "onnx", feature) from exc
    return modules
