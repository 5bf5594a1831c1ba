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

from ..errors import InvalidDocumentError

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


_MT_WORDS = 624  # the Mersenne Twister's state, in 32-bit words
_CUDA_STATE_BYTES = 16  # a CUDA (Philox) generator: seed and offset


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _words(tensor: object) -> bool:
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.dtype == torch.int64
        and tuple(tensor.shape) == (_MT_WORDS,)
        and bool(((tensor >= 0) & (tensor < 2**32)).all())
    )


def _byte_state(tensor: object, size: int) -> bool:
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.dtype == torch.uint8
        and (tuple(tensor.shape) == (size,))
    )


def _problem(state: object) -> str | None:
    """What makes ``state`` something :func:`restore` cannot put back, or None."""
    if not isinstance(state, dict) or not {"python", "torch"} <= set(state):
        return "it is not a table with 'python' and 'torch' generator states"
    if set(state) - {"python", "torch", "numpy", "cuda"}:
        return (
            f"it has unknown generators {sorted(set(state) - {'python', 'torch', 'numpy', 'cuda'})}"
        )
    python = state["python"]
    if not (
        isinstance(python, tuple)
        and len(python) == 3
        and python[0] == 3
        and isinstance(python[1], tuple)
        and len(python[1]) == _MT_WORDS + 1
        and all(_is_int(word, 0, 2**32 - 1) for word in python[1][:-1])
        and _is_int(python[1][-1], 0, _MT_WORDS)
        and (python[2] is None or type(python[2]) is float)
    ):
        return "the 'python' state is not a random.getstate() tuple"
    if not _byte_state(state["torch"], torch.get_rng_state().numel()):
        return "the 'torch' state is not a CPU generator state (uint8 tensor of its size)"
    numpy = state.get("numpy")
    if "numpy" in state and not (  # present means a tuple: None is as malformed as anything
        isinstance(numpy, tuple)
        and len(numpy) == 5
        and numpy[0] == "MT19937"
        and _words(numpy[1])
        and _is_int(numpy[2], 0, _MT_WORDS)
        and _is_int(numpy[3], 0, 1)
        and type(numpy[4]) is float
    ):
        return "the 'numpy' state is not a legacy numpy.random.get_state() tuple"
    cuda = state.get("cuda", [])
    if not isinstance(cuda, list) or not all(_byte_state(t, _CUDA_STATE_BYTES) for t in cuda):
        return "the 'cuda' state is not a list of CUDA generator states"
    return None


def check(state: object, *, source: str) -> None:
    """Raise unless ``state`` is a generator state :func:`restore` can put back unchanged.

    Checked before anything is restored, so a malformed entry makes its step unusable (a
    resume falls back to the previous step) instead of failing half-way through a restore.

    Raises:
        InvalidDocumentError: naming ``source`` and what is wrong.
    """
    problem = _problem(state)
    if problem is not None:
        raise InvalidDocumentError(
            f"{source}: the random generator states are malformed ({problem}); the step is "
            "damaged or was not written by torchkeep, so it is skipped"
        )


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
