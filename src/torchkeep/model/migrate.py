"""Migrating a pickled whole model (``torch.save(model)``) to a pickle-free bundle."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..security import load_pickled_model
from .bundle import save_model


def migrate_pickled_model(
    src: str | os.PathLike[str],
    bundle_dir: str | os.PathLike[str],
    *,
    allow: Iterable[str] = (),
    example_inputs: torch.Tensor | Sequence[Any] | None = None,
    init_args: Mapping[str, Any] | None = None,
) -> Path | str:
    """Scan, load (weights-only, ``allow`` extended) and re-save a pickled model as a bundle.

    Args:
        src: the ``torch.save(model)`` file.
        bundle_dir: the bundle to write.
        allow: module prefixes whose classes you trust (see :func:`load_pickled_model`).
        example_inputs: also save a program (see :func:`save_model`).
        init_args: constructor arguments, when the class has required ones.

    Returns:
        The bundle path.

    Example:
        >>> tk.migrate_pickled_model("old.pth", "net.bundle", allow=("mypkg.models",))
    """
    model = load_pickled_model(src, allow=allow)
    return save_model(model, bundle_dir, example_inputs=example_inputs, init_args=init_args)
