"""Loading a pickled whole model (``torch.save(model)``) only after a scan approves it."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compat import extra_safe_globals
from ..errors import FileFormatError, ModelClassNotFoundError, UnsafeCheckpointError
from ..formats import torch_zip
from .policy import Severity
from .scanner import Finding, ScanReport, scan
from .walker import Global


def _import_global(target: Global) -> Any:
    """Import an allowed global (user-installed code the caller explicitly allowed)."""
    try:
        obj: Any = importlib.import_module(target.module)
        for part in target.name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ModelClassNotFoundError(
            f"{target.full_name} (allowed) cannot be imported ({exc}); install the package "
            "that defines it, or fix the import path"
        ) from None
    return obj


def _refusal(path: Path, offending: list[Finding], allow: tuple[str, ...]) -> str:
    lines = [f"{f.name} ({f.severity.value}: {f.reason}) at {f.where}" for f in offending[:20]]
    more = f"\n  ... and {len(offending) - 20} more" if len(offending) > 20 else ""
    users = sorted({f.module for f in offending if f.severity == Severity.USER})
    if any(f.severity == Severity.DANGEROUS for f in offending):
        fix = "do not load this file; ask its author for a safetensors file or a torchkeep bundle"
    else:
        fix = f"if you trust the code of {', '.join(users)}, pass allow={tuple(users)!r}"
    return (
        f"{path} was refused: loading it would import or call\n  "
        + "\n  ".join(lines)
        + more
        + f"\n(allowed prefixes: {list(allow) or 'none'}). To fix: {fix}"
    )


def load_pickled_model(
    path: str | os.PathLike[str],
    *,
    allow: Iterable[str] = (),
    map_location: torch.device | str = "cpu",
) -> nn.Module:
    """Load a whole model saved with ``torch.save(model, path)`` without trusting the file.

    The file is first scanned (:func:`scan`). Anything dangerous, or any class that is neither
    in torch's weights-only allowlist, nor a ``torch.nn`` layer class, nor under one of the
    ``allow`` module prefixes, refuses the load. Then torch's weights-only unpickler, extended
    by exactly the classes the scan found and allowed (only while this call runs), loads it.

    Args:
        path: a ``torch.save`` file (zip or legacy) holding an ``nn.Module``.
        allow: module prefixes whose classes you trust, e.g. ``("mypkg.models",)``. Their
            modules are imported (that is code you installed, not code from the file).
        map_location: device for the tensors.

    Returns:
        The model, in eval mode.

    Example:
        >>> model = tk.load_pickled_model("old_model.pth", allow=("mypkg.models",))
    """
    path = Path(path)
    allowed = tuple(allow)
    report: ScanReport = scan(path)
    offending = report.offending(allowed)
    if offending:
        raise UnsafeCheckpointError(_refusal(path, offending, allowed))
    extra = [
        _import_global(Global(f.module, f.name[len(f.module) + 1 :]))
        for f in report.findings
        if f.kind == "global" and f.severity in (Severity.TORCH_LAYER, Severity.USER)
    ]
    with extra_safe_globals(extra):
        loaded = torch_zip.load(path, map_location=map_location)
    if not isinstance(loaded, nn.Module):
        raise FileFormatError(
            f"{path} holds a {type(loaded).__name__}, not an nn.Module; read weights with "
            "tk.load_state_dict"
        )
    return loaded.eval()
