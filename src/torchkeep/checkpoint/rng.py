"""Capture and restore every random number generator a training step draws from.

Python's ``random``, NumPy's global generator (when NumPy is installed), torch's CPU generator
and the generator of every CUDA device. Restoring them makes dropout, shuffling and data
augmentation after a resume draw the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # NumPy is optional
    np = None  # type: ignore[assignment]


def capture() -> dict[str, Any]:
    """Return the state of every generator, as values :mod:`torchkeep.tree` can store.

    Example:
        >>> state = capture()
        >>> sorted(state)[:2]
        ['numpy', 'python']
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = (
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            pos,
            has_gauss,
            cached,
        )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Put every generator back in the state :func:`capture` returned.

    Generators recorded but absent here (NumPy not installed, fewer CUDA devices) are skipped
    with a warning; the others are restored.
    """
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        if np is None:
            warnings.warn("NumPy's RNG state was saved but NumPy is not installed", stacklevel=3)
        else:
            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda_states = state.get("cuda", [])
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) > available:
        warnings.warn(
            f"the checkpoint holds RNG states of {len(cuda_states)} CUDA devices but "
            f"{available} are available; only those were restored",
            stacklevel=3,
        )
    for device, device_state in enumerate(cuda_states[:available]):
        torch.cuda.set_rng_state(device_state, device)
