"""Read a committed checkpoint step back, verifying every byte against its manifest.

A tensor file wholly in the page cache whose tensors will mostly be copied into live tensors
in place (a model's parameters, a stepped optimizer's state) is mapped privately
(copy-on-write, pages shared with the cache): one copy, from the cache into place. Any other is
read tensor by tensor into memory of each tensor's own (from the cache where cached, else
direct or buffered as measured), each tensor hashed while the next is read: a freshly built
optimizer has no state to fill, and its state is then read once into the memory it keeps,
instead of mapped, hashed and copied out again.
Every byte is hashed, files in parallel, before anything else happens: the bytes that were
hashed are exactly the bytes that are used. Only once every file of the step is verified does
:meth:`LoadedStep.value` copy the tensors into the memory of the objects being restored (their
parameters, their optimizer state), hand over the tensors read into memory of their own (once),
or copy mapped ones into new memory, so a corrupt step never half-loads and no restored tensor
keeps a file mapped or shares memory with another restored tensor.

A step is read through a descriptor of its directory opened first (``/proc/self/fd/<n>`` on
Linux), so every file comes from the same directory even if a concurrent writer renames it
away (retention) or swaps in a replacement (``overwrite=True``): a mapped file stays readable
after it is unlinked, and the bytes hashed are the bytes mapped. When the directory has left
its name by the time a read fails, :class:`StepVanishedError` says so, and the caller looks
for the newest step again instead of taking the step for damaged.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import tree
from ..errors import (
    ChecksumMismatchError,
    CorruptFileError,
    TorchkeepError,
    TorchkeepFileNotFoundError,
    UnreadableFileError,
    first_line,
)
from ..formats import safetensors as st
from ..hashing import HASH_ALGORITHM, hash_file, new_hasher
from ..manifest import MANIFEST_NAME, files_folder
from ..storage.reading import RangeReader
from . import rng
from .entries import Kind
from .layout import RNG_ENTRY, STATE_NAME, read_state, read_step_manifest

_FD_DIR = Path("/proc/self/fd")
LEGACY_RNG_VERSION = "0.1.0"
LEGACY_RNG_ENTRY = "rng"


class StepVanishedError(TorchkeepFileNotFoundError):
    """A step was renamed away or replaced by a concurrent writer while it was being read."""


@dataclass
class LoadedStep:
    """A verified step: its manifest and every entry rebuilt as ``(kind, value)``.

    The tensors in ``entries`` are either views of a verified file's private mapping (a file
    that was wholly in the page cache) or tensors in memory of their own (read from a file
    that was not); use :meth:`value` to get an entry in memory of its own.
    """

    step: int
    path: Path
    manifest: dict[str, Any]
    entries: dict[str, tuple[Kind, Any]]
    skeletons: dict[str, tree.Json] = field(default_factory=dict, repr=False)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    unclaimed: set[int] = field(default_factory=set, repr=False)
    """``id``s of the tensors in memory of their own that :meth:`value` has not handed out."""

    @property
    def metrics(self) -> dict[str, Any]:
        metrics = self.manifest.get("metrics")
        return dict(metrics) if isinstance(metrics, dict) else {}

    def value(self, name: str, *, into: Mapping[str, torch.Tensor] | None = None) -> Any:
        """Entry ``name`` with its tensors in memory of their own.

        A tensor that was read into memory of its own is handed over as it is, once: the
        first call that reaches it gets it (and ``entries`` shares it from then on), later
        calls get a copy of it, so two values never share memory. Mapped tensors are copied.

        Args:
            name: the entry (``"model"``, ``"optimizer"``, ``"epoch"``).
            into: tensors by flat name (``tree.flatten(obj.state_dict(), root=name)``) to
                fill in place where name, dtype and shape match (a model's parameters, an
                optimizer's state); other tensors are handed over or copied into new memory.

        Returns:
            The entry's value (a state dict for stateful entries).

        Example:
            >>> loaded.value("model", into=tree.flatten(model.state_dict(), root="model").tensors)
        """
        placed: dict[int, torch.Tensor] = {}
        tensors: dict[str, torch.Tensor] = {}
        for flat_name, stored in self.tensors.get(name, {}).items():
            key = id(stored)
            if key not in placed:
                target = (into or {}).get(flat_name)
                if _fits(target, stored):
                    with torch.no_grad():
                        placed[key] = target.copy_(stored)  # type: ignore[union-attr]
                elif key in self.unclaimed:
                    self.unclaimed.discard(key)
                    placed[key] = stored
                else:
                    placed[key] = stored.clone()
            tensors[flat_name] = placed[key]
        source = f"{self.path / STATE_NAME} (entry {name!r})"
        return tree.unflatten(self.skeletons.get(name), tensors, source=source)


def _fits(target: torch.Tensor | None, stored: torch.Tensor) -> bool:
    return (
        isinstance(target, torch.Tensor)
        and _takes_copies(target)
        and target.dtype == stored.dtype
        and target.shape == stored.shape
    )


def _takes_copies(target: torch.Tensor) -> bool:
    return target.device.type == "cpu" and target.is_contiguous() and not target.requires_grad


def _mostly_filled_in_place(header: st.Header, into: Mapping[str, torch.Tensor]) -> bool:
    """Whether tensors of ``into`` can take at least half of the bytes stored in ``header``'s
    file in place: then mapping the file, when cached, saves a copy; otherwise most tensors
    would be copied out of the mapping into new memory, and reading them there is cheaper.

    Tensors are matched by dtype and shape, not by name: the names of a wrapped model's
    tensors differ from the stored ones until :meth:`LoadedStep.value` is given its view.
    """
    places = Counter((t.dtype, tuple(t.shape)) for t in into.values() if _takes_copies(t))
    stored = placed = 0
    for entry in header.entries.values():
        stored += entry.nbytes
        if places[entry.dtype, entry.shape]:
            places[entry.dtype, entry.shape] -= 1
            placed += entry.nbytes
    return 2 * placed >= stored


def _listed_file(directory: Path, manifest: dict[str, Any], name: str) -> Path:
    """The path of the listed file ``name`` of the step ``directory``, checked to exist with
    the size its manifest records."""
    record = manifest["files"].get(name)
    if not isinstance(record, dict):
        raise CorruptFileError(
            f"{directory / MANIFEST_NAME} does not list {name!r}; the step is damaged"
        )
    path = files_folder(directory, manifest) / name
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing; the step is damaged")
    size = path.stat().st_size
    if size != record["size"]:
        raise CorruptFileError(
            f"{path} has {size} bytes, the manifest says {record['size']} (truncated or "
            "replaced); the step is damaged"
        )
    return path


def _mismatch(path: Path) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"{path} does not match its {HASH_ALGORITHM} hash in {MANIFEST_NAME} (corrupted on "
        "disk); restore another step"
    )


def read_tensors(path: Path, expected_hash: object) -> dict[str, torch.Tensor]:
    """Read a safetensors file and check the hash of every byte before returning its tensors.

    Returns:
        Every tensor (tied names as the same tensor): views of a private mapping when the file
        was wholly in the page cache, else each in memory of its own.
    """
    return _read_verified(path, expected_hash)[0]


def _read_verified(
    path: Path, expected_hash: object, into: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], bool]:
    """The verified tensors of ``path``, and whether each is in memory of its own.

    A file wholly in the page cache is mapped privately (pages shared with the cache) when
    ``into`` is None or can take most of its bytes in place; any other is read tensor by
    tensor into fresh memory (:func:`~torchkeep.formats.safetensors.read_owned`), each tensor
    hashed while the next is read. Either way the hash covers the header, then every tensor in
    file order: the tensors tile the data section (the header check guarantees it), so this is
    the whole file's hash the manifest records.
    """
    header = st.read_header(path)
    hasher = new_hasher()
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        hasher.update(f.read(header.data_start))
    with RangeReader(path) as reader:
        owned = not reader.cached(0, header.file_size)
        if not owned and into is not None:  # cached: mapped only to be copied into place
            owned = not _mostly_filled_in_place(header, into)
        if owned:
            for entry, tensor in st.read_owned(header, reader):
                hasher.update(st.tensor_bytes(tensor))
                tensors[entry.name] = tensor
            tensors.update({alias: tensors[name] for alias, name in header.aliases.items()})
    if not owned:
        tensors = st.load_tensors(header)
        for entry in sorted(header.entries.values(), key=lambda e: e.begin):
            hasher.update(st.tensor_bytes(tensors[entry.name]))
    if hasher.hexdigest() != expected_hash:
        raise _mismatch(path)
    return tensors, owned


def _read_state(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    path = _listed_file(directory, manifest, STATE_NAME)
    if hash_file(path)[1] != manifest["files"][STATE_NAME]["hash"]:
        raise _mismatch(path)
    return read_state(directory, manifest)


def read_step(
    directory: Path, *, into: Mapping[str, Mapping[str, torch.Tensor]] | None = None
) -> LoadedStep:
    """Read and verify the committed step at ``directory``.

    Args:
        directory: a ``step-<n>`` directory.
        into: by entry name, the tensors its value will be copied into in place (what
            :meth:`LoadedStep.value` will get as ``into=``). A cached tensor file is mapped
            only when they take most of its bytes; otherwise, and for entries not named, its
            tensors are read into memory of their own, which ``value`` hands over without a
            copy.

    Returns:
        The :class:`LoadedStep`; tensors are on the CPU.

    Raises:
        StepVanishedError: the directory left its name (retired or replaced by a concurrent
            writer) before it could be read whole; look for the newest step again.
        TorchkeepFileNotFoundError: there is no manifest (never committed).
        CorruptFileError: a file is missing, truncated, fails its hash or is malformed
            (:class:`ChecksumMismatchError` for a hash, :class:`UnreadableFileError` for a file
            that cannot be read, :class:`InvalidDocumentError` for a document that breaks its
            schema).

    Example:
        >>> read_step(Path("ckpt/step-00000010")).entries["epoch"]
        ('value', 3)
    """
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        raise StepVanishedError(f"{directory} was removed before it could be read") from None
    except OSError as exc:
        raise UnreadableFileError(f"{directory} cannot be read ({first_line(exc)})") from None
    pinned = _FD_DIR / str(fd) if (_FD_DIR / str(fd)).is_dir() else directory
    try:
        loaded = _read_pinned(pinned, directory.name, into or {})
    except (TorchkeepError, OSError, RuntimeError) as exc:
        if _vanished(directory, fd):
            raise StepVanishedError(
                f"{directory} was retired or replaced by another process while it was read"
            ) from exc
        message = str(exc).replace(str(pinned), str(directory))
        if isinstance(exc, TorchkeepError):
            raise _relabelled(exc, message) from None
        error = UnreadableFileError if isinstance(exc, OSError) else CorruptFileError
        raise error(
            f"{directory} cannot be read ({type(exc).__name__}: {message.splitlines()[0]}); "
            "restore another step"
        ) from None
    finally:
        os.close(fd)
    loaded.path = directory
    return loaded


def _relabelled(exc: TorchkeepError, message: str) -> TorchkeepError:
    """``exc`` with the pinned path in its message replaced by the step's own path."""
    try:
        return type(exc)(message)
    except TypeError:  # an error class with another constructor: keep it as it is
        return exc


def _vanished(directory: Path, fd: int) -> bool:
    """True when ``directory`` no longer names the directory open as ``fd``."""
    held = os.fstat(fd)
    try:
        now = os.stat(directory)
    except OSError:
        return True
    return held.st_nlink == 0 or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)


def _read_pinned(
    directory: Path, name: str, into: Mapping[str, Mapping[str, torch.Tensor]]
) -> LoadedStep:
    manifest = read_step_manifest(directory, name=name)
    if manifest.get("layout") == "sharded-v1":  # written by N ranks: full tensors, verified
        from .distributed.full import read_sharded_step

        return read_sharded_step(directory)
    state = _read_state(directory, manifest)
    _adopt_legacy_rng(manifest, state["entries"])
    files: dict[str, Path] = {}
    for name, raw in state["entries"].items():
        if raw["file"] is not None:
            files[name] = _listed_file(directory, manifest, raw["file"])
    tensors, owned = _verify_files(files, manifest, into)
    loaded = LoadedStep(
        manifest["step"],
        directory,
        manifest,
        {},
        {name: raw.get("value") for name, raw in state["entries"].items()},
        tensors,
        {id(tensor) for name in owned for tensor in tensors[name].values()},
    )
    for name, raw in state["entries"].items():
        source = f"{directory / STATE_NAME} (entry {name!r})"
        value = tree.unflatten(loaded.skeletons[name], tensors.get(name, {}), source=source)
        loaded.entries[name] = (raw["kind"], value)
    if RNG_ENTRY in loaded.entries:
        rng.check(loaded.entries[RNG_ENTRY][1], source=f"{directory / STATE_NAME} ({RNG_ENTRY})")
    return loaded


def _adopt_legacy_rng(manifest: Mapping[str, Any], entries: dict[str, Any]) -> None:
    """Steps written by torchkeep 0.1.0 hold the generator states as the entry ``rng`` (a name
    users could not take then); read it as :data:`RNG_ENTRY`, so their resume stays exact."""
    if (
        manifest.get("torchkeep_version") == LEGACY_RNG_VERSION
        and LEGACY_RNG_ENTRY in entries
        and RNG_ENTRY not in entries
        and entries[LEGACY_RNG_ENTRY]["kind"] == "value"
    ):
        entries[RNG_ENTRY] = entries.pop(LEGACY_RNG_ENTRY)


def _verify_files(
    files: Mapping[str, Path],
    manifest: dict[str, Any],
    into: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
    """Read and hash the tensor files, largest first, on up to two threads (xxh3, reads and
    page faults release the GIL); raise the first problem found.

    Returns:
        Each entry's tensors, and the entries whose tensors are in memory of their own.
    """
    order = sorted(files.items(), key=lambda item: -item[1].stat().st_size)
    expected = {name: manifest["files"][path.name]["hash"] for name, path in order}
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        futures = {
            name: pool.submit(_read_verified, path, expected[name], into.get(name, {}))
            for name, path in order
        }
        results = {name: future.result() for name, future in futures.items()}
    return {name: tensors for name, (tensors, _) in results.items()}, {
        name for name, (_, owned) in results.items() if owned
    }
