"""Converting stored models between formats, bit for bit: the library behind ``convert``.

A conversion is chosen by the kind of the source (recognised by content) and the kind of the
destination (chosen by its suffix); :data:`ROUTES` maps each supported pair to the function
that does it, so a new route is one function and one entry.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint.migrate import import_torch_checkpoint
from .errors import DestinationExistsError, FileFormatError
from .formats import Format, detect_format
from .formats import safetensors as st
from .model import migrate_pickled_model
from .paths import lookup
from .remote_files import (
    Remote,
    StorageOptions,
    check_options_used,
    commit_folder,
    local_copy,
    remote_for,
    upload_file,
)
from .security import scan
from .weights import RESERVED_METADATA, TORCH_SUFFIXES, open_source, save_weights

if TYPE_CHECKING:
    from .storage.transfer import Transfer

SAFETENSORS = "safetensors"
TORCH = "torch"
DIRECTORY = "directory"
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

    source: Path | str
    destination: Path | str
    source_format: Format
    tensors: int = 0
    tied: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Options:
    """What the caller allowed: overwriting, and module prefixes for pickled classes."""

    force: bool
    allow: tuple[str, ...]


Route = Callable[[Path, Path, _Options], Conversion]


def _weights(source: Path, destination: Path, options: _Options) -> Conversion:
    """A state dict (or a checkpoint dict's model part) from one weights format to the other."""
    opened = open_source(source, torch.device("cpu"))
    state = opened.load(torch.device("cpu"))
    conversion = Conversion(source, destination, opened.format, tensors=len(state))
    if opened.source_key is not None:
        conversion.notes.append(
            f"converted the {opened.source_key!r} entry of the checkpoint dict; its other "
            "entries (optimizer, epoch, ...) are not weights and were left behind"
        )
    conversion.tied = st.dedupe_tied(state)[1]
    if opened.header is not None and _kind_of_destination(destination) == TORCH:
        dropped = [k for k in opened.header.metadata if not k.startswith(RESERVED_METADATA)]
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


def _count_written(conversion: Conversion) -> Conversion:
    """Fill in the tensors (and tied names) of a written step or bundle, from its headers."""
    from .describe import describe

    written = describe(conversion.destination)
    conversion.tied = {
        alias: target for target, aliases in written.tied.items() for alias in aliases
    }
    conversion.tensors = len(written.tensors) + len(conversion.tied)
    return conversion


def _to_directory(source: Path, destination: Path, options: _Options) -> Conversion:
    """A pickled whole model becomes a bundle; a tutorial checkpoint dict a checkpoint step.

    Which one is decided by a static scan: only a pickled model names classes beyond tensors
    and containers, and those must be trusted through ``allow``.
    """
    fmt = detect_format(source)
    if scan(source).offending():
        if destination.exists() and not options.force:
            raise DestinationExistsError(
                f"{destination} already exists; pass force=True (--force) to replace it"
            )
        migrate_pickled_model(source, destination, allow=options.allow)
        conversion = Conversion(source, destination, fmt)
        conversion.notes.append(
            f"migrated a pickled whole model into the bundle {destination} (classes trusted: "
            f"{', '.join(options.allow) or 'torch.nn only'})"
        )
        return _count_written(conversion)
    step_dir = import_torch_checkpoint(source, destination, overwrite=options.force)
    conversion = Conversion(source, step_dir, fmt)
    conversion.notes.append(f"imported the checkpoint dict as {step_dir.name} of {destination}")
    return _count_written(conversion)


ROUTES: dict[tuple[str, str], Route] = {
    (TORCH, SAFETENSORS): _weights,
    (SAFETENSORS, TORCH): _weights,
    (TORCH, DIRECTORY): _to_directory,
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
    if path.is_dir() or not path.suffix or path.suffix == ".bundle":
        return DIRECTORY
    raise FileFormatError(
        f"cannot tell which format to write for {path}: give it a .safetensors suffix, one "
        f"of {', '.join(sorted(TORCH_SUFFIXES))}, or a directory name (no suffix or .bundle)"
    )


def convert(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    force: bool = False,
    allow: Sequence[str] = (),
    storage_options: StorageOptions | None = None,
    transfer: Transfer | None = None,
) -> Conversion:
    """Convert a stored model to another format, keeping every tensor bit for bit.

    The source's format is recognised by its content; the destination's is chosen by its
    suffix. Supported: ``torch.save`` files (``.pt``/``.pth``/``.bin``/``.ckpt``, including the
    model part of a tutorial-style checkpoint dict) to ``.safetensors``, and back; to a
    directory, a tutorial-style checkpoint dict becomes a step of a torchkeep checkpoint folder
    and a pickled whole model (``torch.save(model)``) becomes a model bundle, loaded only if
    its classes lie under ``allow``. Tied weights stay tied. Nothing in the source is executed
    unless allowed; the destination is written atomically.

    Either side may be a URL: a source is fetched first (as :func:`load_state_dict` fetches
    one); a destination is converted into a private temporary folder and uploaded, a file as
    one object, a bundle or checkpoint step committed by its manifest created last.

    Args:
        source: the file to read (or its URL).
        destination: the file or directory to write (or its URL).
        force: overwrite ``destination`` if it exists (a checkpoint folder is added to; with
            ``force`` a step of the same number is replaced; not on object storage).
        allow: module prefixes whose classes a pickled whole model may use.
        storage_options: options of the fsspec filesystem of whichever side is a URL.
        transfer: a :class:`Transfer` for whichever side is a URL.

    Returns:
        A :class:`Conversion` saying what was written and what was left behind.

    Example:
        >>> convert("checkpoint.pt", "model.safetensors").notes
        ["converted the 'model_state_dict' entry of the checkpoint dict; ..."]
    """
    check_options_used((source, destination), storage_options, transfer)
    target = remote_for(destination, storage_options, transfer)
    with contextlib.ExitStack() as stack:
        local_source = stack.enter_context(local_copy(source, storage_options, transfer))
        if target is None:
            done = _convert(local_source, Path(destination), force, allow)
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="torchkeep-upload-"))
            local = Path(folder) / target.name
            done = _convert(local_source, local, force, allow)
            _publish(done, local, target, force)
    if target is not None:
        done.destination = str(done.destination).replace(str(local), target.url)
    if local_source != Path(source):
        done.source = str(source)
        done.notes = [note.replace(str(local_source), str(source)) for note in done.notes]
    return done


def _publish(done: Conversion, local: Path, target: Remote, force: bool) -> None:
    """Upload what :func:`_convert` wrote at ``local`` to the URL ``target``."""
    from .checkpoint.remote import refuse_overwrite
    from .model.layout import BUNDLE_KIND

    if local.is_file():
        if not force and target.store().exists(target.name):
            raise DestinationExistsError(
                f"{target.url} already exists; pass force=True (--force) to overwrite it"
            )
        upload_file(local, target)
    elif Path(done.destination) != local:  # a step of a checkpoint folder
        refuse_overwrite(target.url, force)
        step = Path(done.destination)
        commit_folder(
            step,
            Remote(f"{target.url}/{step.name}", target.storage_options, target.transfer),
        )
    else:
        commit_folder(local, target, replace=BUNDLE_KIND if force else None)


def _convert(source: Path, destination: Path, force: bool, allow: Sequence[str]) -> Conversion:
    """:func:`convert` between local paths."""
    lookup(destination)  # a name no file can have is a typed error before any work
    route_key = (_kind_of_source(source), _kind_of_destination(destination))
    route = ROUTES.get(route_key)
    if route is None:
        raise FileFormatError(
            f"{source} is already a {route_key[0]} file; there is nothing to convert for "
            f"{destination} (routes: {', '.join(f'{a} -> {b}' for a, b in ROUTES)})"
        )
    if destination.is_file() and not force:
        raise DestinationExistsError(
            f"{destination} already exists; pass force=True (--force) to overwrite it"
        )
    return route(source, destination, _Options(force, tuple(allow)))
