"""Saving and loading model weights: the ``state_dict`` job, done safely and fast."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from ._gc import gc_paused
from ._version import __version__
from .errors import FileFormatError, StateDictMismatchError, first_line
from .format_versions import WEIGHTS, WEIGHTS_KEY
from .formats import Format, detect_format, require_file, torch_zip
from .formats import safetensors as st
from .paths import write_target
from .remote_files import Remote, StorageOptions, fetched, remote_or_none, upload_file, upload_spans
from .storage.cache import CachePolicy, check_cache_policy, refill_after_save
from .storage.local import atomic_file
from .unwrap import WRAPPER_PREFIXES, strip_prefixes, unwrap

if TYPE_CHECKING:
    from .storage.transfer import Transfer

TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})
# Keys under which training scripts commonly keep the model part of a checkpoint dict.
MODEL_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "weights")
RESERVED_METADATA = ("format", "torchkeep.")

PathLike = str | os.PathLike[str]
Device = torch.device | str


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: modules, optimizers, ..."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


@dataclass
class LoadReport:
    """What :func:`load_weights` did.

    Attributes:
        path: the file read (the URL, for one on object storage).
        format: the format recognised from the file's content.
        loaded: model keys that received stored values.
        missing: model keys the file has no value for.
        unexpected: file keys the model has no place for.
        mismatched: ``(key, stored_shape, model_shape)`` for keys whose shapes differ.
        source_key: the key of a checkpoint dict the weights came from, if any.
        renamed: ``stored key -> model key`` for wrapper prefixes that were fixed.
        tied: ``model key -> key it was loaded through`` for keys the file lacks that share
            their memory in the model with a key the file holds (an HF file of a model with
            tied embeddings stores the shared tensor once).
        notes: one line per thing a user should know (prefix fixes, the key used, ...).
    """

    path: Path | str
    format: Format
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    source_key: str | None = None
    renamed: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.format.value})"]
        lines += [f"note: {note}" for note in self.notes]
        lines += _problem_lines(self)
        return "\n".join(lines)


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _problem_lines(report: LoadReport) -> list[str]:
    lines = []
    if report.missing:
        lines.append(f"missing in the file ({len(report.missing)}): {_listing(report.missing)}")
    if report.unexpected:
        lines.append(f"not in the model ({len(report.unexpected)}): {_listing(report.unexpected)}")
    for key, stored, wanted in report.mismatched[:8]:
        lines.append(f"shape mismatch for {key}: file {list(stored)}, model {list(wanted)}")
    if len(report.mismatched) > 8:
        lines.append(f"... {len(report.mismatched) - 8} more shape mismatches")
    return lines


# --------------------------------------------------------------------------------------------
# saving


def _state_of(model_or_state_dict: nn.Module | Stateful | Mapping[str, torch.Tensor]) -> Any:
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    if isinstance(model_or_state_dict, Stateful):
        return unwrap(model_or_state_dict).state_dict()
    raise TypeError(
        f"save_weights takes a model or a state dict, not {type(model_or_state_dict).__name__}"
    )


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata entry {key!r}: {value!r} is not str -> str; safetensors metadata "
                "holds strings only (use json.dumps for structured values)"
            )
        st.require_utf8(key, "metadata key")
        st.require_utf8(value, f"the value of metadata key {key!r}")
        if key.startswith(RESERVED_METADATA):
            raise ValueError(f"metadata key {key!r} is reserved by torchkeep; choose another name")
        result[key] = value
    return result


def _detach_views(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give each distinct tensor a storage of its own so ``torch.save`` writes only its bytes.

    Tied names (the very same view) stay one tensor. Anything else that views a larger or
    shared storage is cloned: a slice of a big buffer, or the tensors of a memory-mapped
    safetensors file, which all view one map of the whole file (``torch.save`` would store
    that map, or refuse it when the views have different dtypes).
    """
    unique, aliases = st.dedupe_tied(tensors)
    owners = Counter(t.untyped_storage().data_ptr() for t in unique.values())
    detached: dict[str, torch.Tensor] = {}
    for name, tensor in unique.items():
        storage = tensor.untyped_storage()
        alone = owners[storage.data_ptr()] == 1
        exact = alone and storage.nbytes() == tensor.numel() * tensor.element_size()
        detached[name] = tensor.detach() if exact else tensor.detach().clone()
    return {name: detached[aliases.get(name, name)] for name in tensors}


@gc_paused()
def save_weights(
    model_or_state_dict: nn.Module | Stateful | Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    cache: CachePolicy = "auto",
    storage_options: StorageOptions | None = None,
    transfer: Transfer | None = None,
) -> Path | str:
    """Save a model's weights (or a state dict) atomically.

    ``.pt``/``.pth``/``.bin``/``.ckpt`` paths get a ``torch.save`` zip that loads with
    ``torch.load(weights_only=True)``; every other path gets safetensors. Tied weights are
    stored once and come back tied. The file appears at ``path`` only when complete and on disk.
    A URL (``s3://bucket/net.safetensors``, any fsspec URL) gets the same bytes as one object,
    streamed from the tensors' memory as a multipart upload that appears whole or not at all.

    Args:
        model_or_state_dict: an ``nn.Module`` (or anything with ``state_dict()``) or a mapping
            of names to tensors, on any device.
        path: where to write.
        metadata: string key/value pairs stored in the safetensors header.
        cache: what the save leaves in the page cache: ``"keep"`` (a load right after reads
            memory), ``"drop"`` (direct I/O: nothing cached, nothing else evicted) or
            ``"auto"`` (keep while the page cache takes the bytes as fast as direct I/O
            would, then drop; drop from the start for a file over half the available
            memory). Every policy is equally durable. A ``torch.save`` file is always
            written through the cache.
        storage_options: for a URL, options of its fsspec filesystem (credentials,
            ``endpoint_url``...).
        transfer: for a URL, a :class:`Transfer` (part size, parallelism, retries, deadline).

    Returns:
        The path written (the URL, for a URL).

    Raises:
        CachePolicyError: ``cache`` names no policy.
        RemoteStorageError: an upload failed for good or the transfer's deadline passed.

    Example:
        >>> tk.save_weights(model, "net.safetensors", metadata={"epoch": "3"})
    """
    remote = remote_or_none(path, storage_options, transfer)
    path = Path(path) if remote is None else PurePosixPath(remote.name)
    cache = check_cache_policy(cache)
    tensors = _state_of(model_or_state_dict)
    st.validate_for_save(tensors, header=path.suffix not in TORCH_SUFFIXES)
    user_metadata = _check_metadata(metadata)
    if remote is None:
        existing = write_target(Path(path))
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise FileFormatError(f"cannot write weights to {path}: it is a directory")
    if path.suffix in TORCH_SUFFIXES:
        if user_metadata:
            raise ValueError(
                f"metadata cannot be stored in a torch.save file ({path.name}); "
                "save to a .safetensors path to keep it"
            )
        if remote is not None:
            return _save_torch_zip_remote(_detach_views(tensors), remote)
        torch_zip.save(_detach_views(tensors), Path(path))
        return Path(path)
    unique, file_metadata = safetensors_payload(tensors, user_metadata)
    if remote is not None:
        upload_spans(remote, st.encode(unique, file_metadata))
        return remote.url
    with atomic_file(path) as f:
        st.write_file(f, unique, metadata=file_metadata, cache=cache)
    refill_after_save(cache, [Path(path)])
    return Path(path)


def _save_torch_zip_remote(tensors: Mapping[str, torch.Tensor], remote: Remote) -> str:
    """A ``torch.save`` file is written by torch to a private temporary file, then uploaded."""
    with tempfile.TemporaryDirectory(prefix="torchkeep-upload-") as folder:
        local = Path(folder) / remote.name
        torch_zip.save(tensors, local)
        upload_file(local, remote)
    return remote.url


def safetensors_payload(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (tied ones once) and the header metadata torchkeep records."""
    unique, aliases = st.dedupe_tied(tensors)
    file_metadata = {
        "format": "pt",
        "torchkeep.version": __version__,
        WEIGHTS_KEY: str(WEIGHTS.writes),
        "torchkeep.dtypes": st.summarize_dtypes(unique.values()),
        **(metadata or {}),
    }
    if aliases:
        file_metadata[st.ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    return unique, file_metadata


# --------------------------------------------------------------------------------------------
# reading


@dataclass
class StoredTensors:
    """A readable set of stored tensors, with their shapes known before any data is read."""

    path: Path
    format: Format
    shapes: dict[str, tuple[int, ...]]
    header: st.Header | None = None
    tensors: dict[str, torch.Tensor] | None = None
    source_key: str | None = None

    def load(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every tensor by name (tied names share one tensor), lazily mapped where possible."""
        if self.header is not None:
            return st.load_tensors(self.header, device=device)
        assert self.tensors is not None
        return self.tensors

    def read_into(self, targets: Mapping[str, torch.Tensor]) -> None:
        """Copy the named stored tensors into ``targets``' memory (shapes already checked)."""
        if self.header is not None:
            st.read_into(self.header, targets)
            return
        assert self.tensors is not None
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(self.tensors[name])


def _model_part(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The flat name -> tensor mapping inside whatever a ``torch.save`` file held."""
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None
    if isinstance(obj, Mapping):
        for key in MODEL_KEYS:
            part = obj.get(key)
            if isinstance(part, Mapping) and all(
                isinstance(v, torch.Tensor) for v in part.values()
            ):
                return dict(part), key
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise FileFormatError(
            f"{path} holds a dict whose keys ({keys}) include no model state dict "
            f"(looked for {', '.join(MODEL_KEYS)}); load it with torch.load(weights_only=True) "
            "and pass the right part to load_weights"
        )
    raise FileFormatError(
        f"{path} holds a {type(obj).__name__}, not a state dict. A pickled whole model loads "
        "with tk.load_pickled_model(path, allow=...) after a scan"
    )


def _directory_source(path: Path, fmt: Format, device: torch.device) -> StoredTensors:
    """The verified model weights of a checkpoint folder, checkpoint step or model bundle."""
    from .checkpoint.model_file import verified_model_tensors

    file, tensors = verified_model_tensors(path, fmt)
    if device.type != "cpu":
        moved: dict[int, torch.Tensor] = {}
        tensors = {name: moved.setdefault(id(t), t.to(device)) for name, t in tensors.items()}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    return StoredTensors(file, fmt, shapes, tensors=tensors)


def open_source(path: Path, device: torch.device) -> StoredTensors:
    """Recognise ``path`` by content and prepare to read its tensors (for torchkeep's readers).

    Safetensors files are only parsed (their header fully validated); ``torch.save`` files are
    scanned and loaded weights-only, memory-mapped. Directories resolve to their weights file,
    which is hashed against its manifest first (in a checkpoint folder: of the newest step
    whose weights are intact, with a warning for each newer one that is not). A
    ``save_pretrained`` folder or a shard index (``*.index.json``) is read through
    :mod:`torchkeep.pretrained`, its index checked against its shards first.
    """
    fmt = detect_format(path)  # a missing or impossible path is a typed error here
    if fmt == Format.UNKNOWN:
        from .pretrained import open_pretrained

        pretrained = open_pretrained(path, device)
        if pretrained is not None:
            return pretrained
    if path.is_dir():
        return _directory_source(path, fmt, device)
    require_file(path)
    if fmt == Format.SAFETENSORS:
        header = st.read_header(path)
        shapes = {name: entry.shape for name, entry in header.entries.items()}
        shapes.update({alias: shapes[target] for alias, target in header.aliases.items()})
        return StoredTensors(path, fmt, shapes, header=header)
    if fmt in (Format.TORCH_ZIP, Format.TORCH_LEGACY, Format.PICKLE):
        tensors, source_key = _model_part(torch_zip.load(path, map_location=device), path)
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        return StoredTensors(path, fmt, shapes, tensors=tensors, source_key=source_key)
    hints = {
        Format.TORCHSCRIPT: "it is a TorchScript archive (deprecated upstream); load it with "
        "torch.jit.load if you trust it, then save_weights(model.state_dict(), ...)",
        Format.PT2: "it is a torch.export program; load it with tk.load_model",
        Format.ONNX: "it is an ONNX model, which holds no PyTorch state dict",
    }
    raise FileFormatError(
        f"{path} is not a weights file torchkeep can read: "
        + hints.get(fmt, "its content is neither safetensors nor a torch.save file")
    )


@gc_paused()
def load_state_dict(
    path: PathLike,
    *,
    map_location: Device = "cpu",
    storage_options: StorageOptions | None = None,
    transfer: Transfer | None = None,
) -> dict[str, torch.Tensor]:
    """Read a state dict from a weights file, checkpoint or bundle, never executing code.

    The format is recognised by content: safetensors (memory-mapped, read lazily), ``torch.save``
    files (weights-only), the model part of a tutorial-style checkpoint dict, torchkeep
    checkpoint steps or model bundles, ``save_pretrained`` folders and shard indexes (checked
    against their shards first). Tied tensors come back as one tensor under each name.

    A URL (``s3://...``, any fsspec URL) is fetched first (a folder: its manifest, then the
    files it lists) into a private temporary folder, and read by exactly the same checks.

    Args:
        path: the file or directory, or its URL.
        map_location: device for the returned tensors.
        storage_options: for a URL, options of its fsspec filesystem.
        transfer: for a URL, a :class:`Transfer` (parallel reads, retries, deadline).

    Returns:
        A dict of names to tensors.

    Raises:
        RemoteStorageError: for a URL, a read failed for good or the deadline passed.

    Example:
        >>> model.load_state_dict(tk.load_state_dict("net.safetensors"))
    """
    device = torch.device(map_location)
    remote = remote_or_none(path, storage_options, transfer)
    if remote is None:
        return open_source(Path(path), device).load(device)
    with fetched(remote) as local:
        return open_source(local, device).load(device)


def _match_keys(stored: list[str], wanted: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map stored keys to model keys, fixing wrapper prefixes; return the map and notes."""
    wanted_set = set(wanted)
    mapping = {key: key for key in stored if key in wanted_set}
    unmatched_wanted = {strip_prefixes(k): k for k in wanted if k not in mapping}
    fixed: dict[str, int] = {}
    for key in stored:
        if key in mapping:
            continue
        target = unmatched_wanted.pop(strip_prefixes(key), None)
        if target is not None:
            mapping[key] = target
            stripped = key[: len(key) - len(strip_prefixes(key))]
            added = target[: len(target) - len(strip_prefixes(target))]
            change = f"'{stripped}' -> '{added}'"
            fixed[change] = fixed.get(change, 0) + 1
    notes = [
        f"fixed the key prefix {change} on {count} keys "
        f"({', '.join(w for p, w in WRAPPER_PREFIXES.items() if p in change)} wrapper)"
        for change, count in fixed.items()
    ]
    return mapping, notes


def has_custom_loading(model: nn.Module) -> bool:
    """True if some submodule customises state-dict loading (hooks, extra state, overrides)."""
    base = nn.Module._load_from_state_dict
    for module in model.modules():
        if module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks:
            return True
        if type(module).set_extra_state is not nn.Module.set_extra_state:
            return True
        override = type(module)._load_from_state_dict
        if override is not base and not type(module).__module__.startswith("torch.nn."):
            return True
    return False


def _memory_of(value: Any) -> object:
    """What identifies the memory a state-dict value lives in: two keys with the same identity
    are tied (one parameter under two names, or two views of the same bytes)."""
    if (
        not isinstance(value, torch.Tensor)
        or value.layout != torch.strided
        or value.is_meta
        or value.data_ptr() == 0
    ):
        return ("object", id(value))
    return (value.device, value.data_ptr(), tuple(value.shape), value.stride(), value.dtype)


def _declared_ties(model: nn.Module) -> dict[str, str]:
    """``tied key -> source key`` as the model declares them (transformers'
    ``all_tied_weights_keys``/``_tied_weights_keys``), or nothing."""
    for attribute in ("all_tied_weights_keys", "_tied_weights_keys"):
        declared = getattr(model, attribute, None)
        if isinstance(declared, Mapping):
            return {str(k): str(v) for k, v in declared.items()}
    return {}


def _resolve_ties(report: LoadReport, model: nn.Module, expected: Mapping[str, Any]) -> None:
    """Move missing keys that share memory with a loaded key from ``missing`` to ``tied``.

    Ties are taken from the live model only (the same parameter under two names, or the same
    bytes), never from the file: a file cannot make a key count as loaded. A tie the model
    declares but does not have in memory stays missing, with a note saying how to fix it.
    """
    if not report.missing:  # nothing to resolve: skip walking every loaded key
        return
    loaded_at: dict[object, str] = {}
    for key in report.loaded:
        loaded_at.setdefault(_memory_of(expected[key]), key)
    loaded_keys = set(loaded_at.values())
    declared = _declared_ties(model)
    still_missing = []
    for key in report.missing:
        source = loaded_at.get(_memory_of(expected[key]))
        if source is not None:
            report.tied[key] = source
        else:
            still_missing.append(key)
            if declared.get(key) in loaded_keys:
                report.notes.append(
                    f"{key} is declared tied to {declared[key]} but does not share its memory; "
                    "call model.tie_weights() before loading"
                )
    report.missing = still_missing
    if report.tied:
        report.notes.append(
            f"{len(report.tied)} keys absent from the file share memory with loaded keys "
            f"(tied): {_listing([f'{k} -> {v}' for k, v in report.tied.items()])}"
        )


def _build_report(
    source: StoredTensors, model: nn.Module, expected: Mapping[str, Any]
) -> tuple[LoadReport, dict[str, str]]:
    mapping, notes = _match_keys(list(source.shapes), list(expected))
    report = LoadReport(source.path, source.format, source_key=source.source_key)
    report.renamed = {k: v for k, v in mapping.items() if k != v}
    report.notes = notes
    if source.source_key:
        report.notes.insert(0, f"used the {source.source_key!r} entry of the checkpoint dict")
    matched_targets = set(mapping.values())
    report.missing = [k for k in expected if k not in matched_targets]
    report.unexpected = [k for k in source.shapes if k not in mapping]
    usable = {}
    for stored_key, model_key in mapping.items():
        target = expected[model_key]
        model_shape = tuple(target.shape) if isinstance(target, torch.Tensor) else ()
        if source.shapes[stored_key] != model_shape:
            report.mismatched.append((model_key, source.shapes[stored_key], model_shape))
        else:
            usable[stored_key] = model_key
            report.loaded.append(model_key)
    _resolve_ties(report, model, expected)
    return report, usable


def _raise_mismatch(report: LoadReport) -> None:
    fixes = ["pass strict=False to load the keys that match and get the rest in the report"]
    if report.mismatched:
        fixes.insert(0, "build the model with the sizes it was trained with")
    raise StateDictMismatchError(
        f"the weights in {report.path} do not fit the model:\n  "
        + "\n  ".join(_problem_lines(report))
        + "\nTo fix: "
        + "; or ".join(fixes)
    )


@contextlib.contextmanager
def undo_on_error(model: nn.Module) -> Iterator[None]:
    """Put every parameter and buffer of ``model`` back as it was if the block raises.

    For models that customise loading (see :func:`has_custom_loading`), whose own code may
    raise after torch copied part of a state; costs one copy of the model's tensors.
    """
    live = {k: v for k, v in model.state_dict(keep_vars=True).items() if torch.is_tensor(v)}
    backup = {key: tensor.detach().clone() for key, tensor in live.items()}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for key, tensor in live.items():
                tensor.detach().copy_(backup[key])
        raise


def _load_or_roll_back(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict(state, strict=False)``, undone if the model's own code raises."""
    try:
        with undo_on_error(model):
            model.load_state_dict(state, strict=False)
    except Exception as exc:
        raise StateDictMismatchError(
            f"the weights in {path} were refused by the model's own loading code "
            f"({type(exc).__name__}: {first_line(exc)}); every parameter and buffer was put "
            "back as it was. Check the model's load_state_dict hooks or set_extra_state"
        ) from exc


@gc_paused()
def load_weights(
    model: nn.Module,
    path: PathLike,
    *,
    strict: bool = True,
    map_location: Device = "cpu",
    storage_options: StorageOptions | None = None,
    transfer: Transfer | None = None,
) -> LoadReport:
    """Load stored weights into ``model`` in place and report what happened.

    Reads safetensors, ``torch.save`` files (weights-only), tutorial-style checkpoint dicts
    (their model part), checkpoints, bundles, ``save_pretrained`` folders and shard indexes
    (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``). A wrapped ``model``
    (``torch.compile``, DataParallel, DDP) is filled through the module inside; stored keys
    with a ``module.`` or ``_orig_mod.`` prefix are matched automatically. A key the file lacks
    that shares its memory in ``model`` with a loaded key (tied embeddings) is reported in
    ``report.tied``, not as missing. Values are read straight into the parameters' memory
    where dtype and layout allow. A URL is fetched first into a private temporary folder and
    read by exactly the same checks, all of them before the first parameter changes.

    Args:
        model: the module to fill.
        path: the weights file or directory, or its URL (``s3://bucket/net.safetensors``).
        strict: raise :class:`StateDictMismatchError` (before changing anything) if any key is
            missing, unexpected or of another shape. With ``strict=False`` only the keys that
            fit are loaded; either way every check runs before the first byte changes, and a
            model whose own loading code (hooks, ``set_extra_state``) raises gets every
            parameter and buffer back as it was.
        map_location: where intermediate tensors of ``torch.save`` files are placed.
        storage_options: for a URL, options of its fsspec filesystem.
        transfer: for a URL, a :class:`Transfer` (parallel reads, retries, deadline).

    Returns:
        A :class:`LoadReport` listing loaded, missing, unexpected and mismatched keys.

    Raises:
        RemoteStorageError: for a URL, a read failed for good or the deadline passed.

    Example:
        >>> report = tk.load_weights(model, "net.safetensors", strict=False)
        >>> report.missing
    """
    device = torch.device(map_location)
    remote = remote_or_none(path, storage_options, transfer)
    if remote is None:
        return _load_weights(model, Path(path), strict, device)
    with fetched(remote) as local:
        report = _load_weights(model, local, strict, device)
    report.path = remote.url
    return report


def _load_weights(model: nn.Module, path: Path, strict: bool, device: torch.device) -> LoadReport:
    """:func:`load_weights` of a local path."""
    source = open_source(path, device)
    model = unwrap(model)
    expected = model.state_dict(keep_vars=True)
    report, usable = _build_report(source, model, expected)
    if strict and not report.ok:
        _raise_mismatch(report)
    if has_custom_loading(model):
        stored = source.load(device)
        _load_or_roll_back(model, {usable[k]: stored[k] for k in usable}, source.path)
        report.notes.append("used the model's own load_state_dict (it customises loading)")
        return report
    targets: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for stored_key, model_key in usable.items():
        target = expected[model_key].detach()
        identity = (target.data_ptr(), tuple(target.stride()))
        if identity not in seen:
            seen.add(identity)
            targets[stored_key] = target
    source.read_into(targets)
    return report
