"""Wrapper modules (``torch.compile``, DataParallel/DDP) and the key prefixes they add.

A wrapped model's ``state_dict()`` names every key with a prefix: ``_orig_mod.`` for a
``torch.compile``d module, ``module.`` for ``nn.DataParallel`` and
``DistributedDataParallel``. torchkeep stores the clean keys of the module inside the
wrapper, so a file or step loads into the plain model and into any wrapped one alike. The
wrappers are recognised by type (a plain submodule named ``module`` is not a wrapper).
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from typing import Any, TypeVar

from torch import nn

# Prefix -> the wrapper that adds it, for messages.
WRAPPER_PREFIXES = {"module.": "DataParallel/DDP", "_orig_mod.": "torch.compile"}

T = TypeVar("T")


def _inner(obj: object) -> nn.Module | None:
    """The module ``obj`` wraps, or None when it is no wrapper."""
    if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        wrapped = obj.module
        return wrapped if isinstance(wrapped, nn.Module) else None
    # torch.compile's wrapper lives in torch._dynamo; a process that never imported it has
    # no compiled module, so the (slow) import is never forced here.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    if optimized is not None and isinstance(obj, optimized):
        inner = obj._orig_mod
        return inner if isinstance(inner, nn.Module) else None
    return None


def unwrap(obj: T) -> T:
    """The module inside ``torch.compile``/DataParallel/DDP wrappers (any nesting), else ``obj``.

    Args:
        obj: a module, possibly wrapped, or anything else (returned as it is).

    Returns:
        The innermost wrapped module; it shares every parameter with ``obj``.

    Example:
        >>> unwrap(torch.compile(net)) is net
        True
    """
    current: Any = obj
    while (inner := _inner(current)) is not None:
        current = inner
    return current  # type: ignore[no-any-return]


def strip_prefixes(key: str) -> str:
    """``key`` without the wrapper prefixes at its start (``_orig_mod.module.fc.w`` -> ``fc.w``)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _leading_prefixes(keys: Collection[str]) -> list[str]:
    """The wrapper prefixes every key starts with, outermost first."""
    prefixes: list[str] = []
    remaining = list(keys)
    while remaining:
        common = [p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in remaining)]
        if not common:
            break
        prefixes.append(common[0])
        remaining = [k[len(common[0]) :] for k in remaining]
    return prefixes


class _Holder(nn.Module):
    """A container that holds a module under a wrapper's attribute name and adds nothing else."""


def _held(module: nn.Module, prefixes: list[str]) -> nn.Module:
    """``module`` held in containers named like the wrappers that add ``prefixes``."""
    for prefix in reversed(prefixes):
        holder = _Holder()
        holder.add_module(prefix[:-1], module)
        module = holder
    return module


def matching_view(module: nn.Module, keys: Collection[str]) -> nn.Module:
    """A module sharing ``module``'s parameters whose ``state_dict`` keys best match ``keys``
    (the keys of a stored state).

    Clean keys give the module inside every wrapper; keys saved with wrapper prefixes (by an
    older torchkeep, or another tool) give that module held in plain containers named like
    the wrappers (``module``, ``_orig_mod``), so loading through the view fills ``module``.
    Of the candidates, the one sharing most keys with ``keys`` wins (the plain module on a tie).

    Example:
        >>> matching_view(torch.compile(net), ["fc.weight"]) is net
        True
    """
    inner = unwrap(module)
    prefixes = _leading_prefixes(keys)
    wanted = set(keys)
    candidates = [_held(inner, prefixes[:depth]) for depth in range(len(prefixes) + 1)]
    return max(candidates, key=lambda view: len(wanted & set(view.state_dict())))
