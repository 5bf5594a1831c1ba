"""Converting stored models between formats, bit for bit: the library behind ``convert``.

A conversion is chosen by the kind of the source (recognised by content) and the kind of the
destination (chosen by its suffix); :data:`ROUTES` maps each supported pair to the function
that does it, so a new route is one function and one entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DestinationExistsError, FileFormatError
from .formats import Format, detect_format
from .formats import safetensors as st
from .weights import _RESERVED_METADATA, TORCH_SUFFIXES, _open_source, save_weights

SAFETENSORS = "safetensors"
TORCH = "torch"
_SOURCE_KINDS = {
    Format.SAFETENSORS: SAFETENSORS,
    Format.TORCH_ZIP: TORCH,
    Format.TORCH_LEGACY: TORCH,
    Format.PICKLE: TORCH,
}


@dataclass
class Conversion:
    """What :func:`convert` did.

    Attributes:
        source: the file read.
        destination: the file written.
        source_format: the format recognised from the source's content.
        tensors: number of names written (tied names included).
        tied: ``alias -> stored name`` for names that share one tensor.
        notes: one line per thing a user should know (the checkpoint entry used, what was
            left behind).
    """

    source: Path
    destination: Path
    source_format: Format
    tensors: int = 0
    tied: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


Route = Callable[[Path, Path], Conversion]


def _weights(source: Path, destination: Path) -> Conversion:
    """A state dict (or a checkpoint dict's model part) from one weights format to the other."""
    opened = _open_source(source, torch.device("cpu"))
    state = opened.load(torch.device("cpu"))
    conversion = Conversion(source, destination, opened.format, tensors=len(state))
    if opened.source_key is not None:
        conversion.notes.append(
            f"converted the {opened.source_key!r} entry of the checkpoint dict; its other "
            "entries (optimizer, epoch, ...) are not weights and were left behind"
        )
    conversion.tied = st.dedupe_tied(state)[1]
    if opened.header is not None and _kind_of_destination(destination) == TORCH:
        dropped = [k for k in opened.header.metadata if not k.startswith(_RESERVED_METADATA)]
        if dropped:
            conversion.notes.append(
                f"metadata {', '.join(dropped)} was not kept: a torch.save file has no place for it"
            )
    try:
        st.validate_for_save(state)
    except (TypeError, ValueError) as exc:
        raise FileFormatError(f"{source} cannot be converted to {destination}: {exc}") from None
    save_weights(state, destination)
    return conversion


ROUTES: dict[tuple[str, str], Route] = {
    (TORCH, SAFETENSORS): _weights,
    (SAFETENSORS, TORCH): _weights,
}


def _kind_of_source(path: Path) -> str:
    fmt = detect_format(path)
    kind = _SOURCE_KINDS.get(fmt)
    if kind is None:
        raise FileFormatError(
            f"{path} holds {fmt.value} content, which torchkeep cannot convert; it converts "
            "safetensors and torch.save files"
        )
    return kind


def _kind_of_destination(path: Path) -> str:
    if path.suffix == ".safetensors":
        return SAFETENSORS
    if path.suffix in TORCH_SUFFIXES:
        return TORCH
    raise FileFormatError(
        f"cannot tell which format to write for {path}: give it a .safetensors suffix or one "
        f"of {', '.join(sorted(TORCH_SUFFIXES))}"
    )


def convert(
    source: str | os.PathLike[str], destination: str | os.PathLike[str], *, force: bool = False
) -> Conversion:
    """Convert a stored model to another format, keeping every tensor bit for bit.

    The source's format is recognised by its content; the destination's is chosen by its
    suffix. Supported: ``torch.save`` files (``.pt``/``.pth``/``.bin``/``.ckpt``, including the
    model part of a tutorial-style checkpoint dict) to ``.safetensors``, and back. Tied weights
    stay tied. Nothing in the source is executed; the destination is written atomically.

    Args:
        source: the file to read.
        destination: the file to write.
        force: overwrite ``destination`` if it exists.

    Returns:
        A :class:`Conversion` saying what was written and what was left behind.

    Example:
        >>> convert("checkpoint.pt", "model.safetensors").notes
        ["converted the 'model_state_dict' entry of the checkpoint dict; ..."]
    """
    source, destination = Path(source), Path(destination)
    route_key = (_kind_of_source(source), _kind_of_destination(destination))
    route = ROUTES.get(route_key)
    if route is None:
        raise FileFormatError(
            f"{source} is already a {route_key[0]} file; there is nothing to convert for "
            f"{destination} (routes: {', '.join(f'{a} -> {b}' for a, b in ROUTES)})"
        )
    if destination.exists() and not force:
        raise DestinationExistsError(
            f"{destination} already exists; pass force=True (--force) to overwrite it"
        )
    return route(source, destination)
