"""Model bundles: a directory holding a model's class, constructor arguments and weights (and
optionally its program), written atomically with a manifest of content hashes. No pickle."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import (
    ChecksumMismatchError,
    FileFormatError,
    InitArgsError,
    InvalidDocumentError,
    ModelClassNotFoundError,
    TorchkeepError,
    UnsafeBundleError,
    UnsafeCheckpointError,
    first_line,
)
from ..format_versions import BUNDLE
from ..formats import Format, detect_format
from ..formats import safetensors as st
from ..hashing import hash_file
from ..manifest import (
    FileRecord,
    files_folder,
    find_problems,
    read_manifest,
    write_json,
    write_manifest,
    write_tensors,
)
from ..paths import write_target
from ..remote_files import Remote, StorageOptions, commit_folder, fetched, remote_or_none
from ..schema import validate
from ..storage.cache import CachePolicy, check_cache_policy, refill_after_save
from ..storage.local import staged_directory
from ..unwrap import unwrap
from ..weights import load_weights, safetensors_payload
from .builders import Builder, builder_for, builder_named
from .builders.construct import (
    MAX_COMPUTED_BYTES,
    buffer_cast,
    build_without_init,
    built_size,
    cast_buffers,
    materialise,
    rebuild_problems,
    summary,
)
from .capture import (
    captured_init_args,
    decode,
    encode,
    holds_config,
    required_parameters,
    resolve,
)
from .classpath import import_class, importable_module, require_class_path
from .config import BundleConfig, read_config
from .layout import (
    BUNDLE_KIND,
    CONFIG_NAME,
    PROGRAM_NAME,
    WEIGHTS_NAME,
    bundle_files,
    content_problems,
)
from .program import export_program, load_program

if TYPE_CHECKING:
    from ..storage.transfer import Transfer

_ALIASES: dict[str, str] = {}
PathLike = str | os.PathLike[str]

BUILDER_FORMAT_VERSION = 2
"""The manifest ``format_version`` of a bundle whose ``config.json`` holds a ``builder`` record
(torchkeep 0.2.0 and older cannot rebuild it, and refuse it by this version); bundles rebuilt
from their class and arguments are still written as ``BUNDLE.writes`` (1)."""


def register_alias(old: str, new: str) -> None:
    """Load bundles that recorded class ``old`` with class ``new`` (after a move or rename).

    Args:
        old: the import path stored in bundles, e.g. ``"old.module.Net"``.
        new: where the class lives now, e.g. ``"new.module.Net"``.

    Example:
        >>> tk.register_alias("research.net.Net", "product.models.Net")

    Raises:
        ModelClassNotFoundError: ``old`` or ``new`` is not an absolute ``module.Class`` path.
    """
    fix = "Give absolute class paths such as 'package.module.Class'"
    old = require_class_path(old, "register_alias", fix)
    _ALIASES[old] = require_class_path(new, f"register_alias({old!r}, ...)", fix)


def class_path(cls: type) -> str:
    """``module.QualName`` of ``cls``, naming the real module of a script run with ``-m``."""
    module = cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    return f"{module}.{cls.__qualname__}"


def _init_config(model: nn.Module, init_args: Mapping[str, Any] | None) -> dict[str, Any]:
    cls = type(model)
    if init_args is not None:
        kwargs = {str(k): encode(v, str(k)) for k, v in init_args.items()}
        config: dict[str, Any] = {"args": [], "kwargs": kwargs}
    else:
        config = captured_init_args(model) or {"args": [], "kwargs": {}}
    if init_args is not None or captured_init_args(model) is None:
        missing = [p for p in required_parameters(cls) if p not in config["kwargs"]]
        if missing:
            raise InitArgsError(
                f"{cls.__qualname__}.__init__ needs {', '.join(missing)}, which were not "
                "recorded. Pass init_args={"
                + ", ".join(f"{m!r}: ..." for m in missing)
                + "} with JSON values (numbers, strings, lists, dicts) to save_model, or derive "
                "the class from tk.Keepable to record them"
            )
    return config


def _rebuilt(make: Callable[[], nn.Module], what: str) -> nn.Module:
    """The model ``make`` builds the way :func:`load_model` builds it (weights on the meta
    device), or, where that fails, a normal build (as the load falls back to)."""
    try:
        return build_without_init(make)
    except TorchkeepError:
        raise
    except Exception:
        pass
    try:
        return make()
    except TorchkeepError:
        raise
    except Exception as exc:
        raise InitArgsError(
            f"{what} cannot be rebuilt from what the bundle would record ({type(exc).__name__}: "
            f"{first_line(exc)}), so nothing was written. Pass init_args= with the arguments "
            "it was built with, or derive its class from tk.Keepable"
        ) from exc


def _check_rebuilds(model: nn.Module, rebuilt: nn.Module, recipe: str) -> dict[str, Any]:
    """Raise unless ``rebuilt`` (what a load would build) takes ``model``'s weights and holds
    the same non-persistent buffers: a bundle that would not load is never written. Returns
    what ``config.json`` must add for the load to match: ``buffer_dtype`` when the model's
    floating non-persistent buffers were cast after it was built."""
    cast = buffer_cast(model, rebuilt)
    if cast is not None:
        cast_buffers(rebuilt, cast)
    problems = rebuild_problems(model, rebuilt)
    if type(rebuilt) is not type(model):
        problems.insert(0, f"it builds a {class_path(type(rebuilt))}")
    if problems:
        raise InitArgsError(
            f"{recipe} would not rebuild this {type(model).__qualname__} ({summary(problems)}), "
            "so nothing was written. Pass init_args= with the arguments it was built with, or "
            "derive its class from tk.Keepable"
        )
    return {} if cast is None else {"buffer_dtype": str(cast).removeprefix("torch.")}


def _model_config(model: nn.Module, init_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config.json`` for ``model`` (its class and arguments, or its builder's recipe), after
    proving that a load rebuilds it."""
    builder = builder_for(model)
    if builder is not None:
        return _builder_config(model, builder, init_args or {})
    init = _init_config(model, init_args)
    cls = type(model)
    args, kwargs = _arguments(decode(init["args"]), decode(init["kwargs"]))
    rebuilt = _rebuilt(lambda: cls(*args, **kwargs), cls.__name__)
    recipe = f"{cls.__qualname__}(*{init['args']!r:.200}, **{init['kwargs']!r:.200})"
    extra = _check_rebuilds(model, rebuilt, recipe)
    return {"class": class_path(cls), "init": init, **extra}


def _arguments(args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Recorded constructor arguments with their config objects made (see capture.resolve)."""
    return [resolve(a) for a in args], {k: resolve(v) for k, v in kwargs.items()}


def _format_version(config: Mapping[str, Any]) -> int:
    """The manifest format version of a bundle with this ``config.json``: the one place it is
    chosen. A builder record, a recorded config object or a buffer cast (which torchkeep 0.2.0
    would ignore) needs :data:`BUILDER_FORMAT_VERSION`."""
    init = config["init"]
    if {"builder", "buffer_dtype"} & set(config):
        return BUILDER_FORMAT_VERSION
    if holds_config(init["args"]) or holds_config(init["kwargs"]):
        return BUILDER_FORMAT_VERSION
    return BUNDLE.writes


def _builder_config(
    model: nn.Module, builder: Builder, init_args: Mapping[str, Any]
) -> dict[str, Any]:
    """``config.json`` for a model a builder describes: its spec, checked against the builder's
    schema and rebuilt before anything is written."""
    spec = builder.record(model, init_args)
    try:
        validate(spec, builder.schema, source=f"the {builder.name!r} builder's spec")
    except InvalidDocumentError as exc:
        raise InitArgsError(f"{type(model).__qualname__} cannot be saved: {exc}") from None
    encoded = encode(spec, f"{builder.name} spec")
    decoded = decode(encoded)
    rebuilt = _rebuilt(lambda: builder.build(decoded), type(model).__qualname__)
    extra = _check_rebuilds(model, rebuilt, f"the {builder.name!r} builder's recipe")
    return {
        "class": class_path(type(model)),
        "init": {"args": [], "kwargs": {}},
        "builder": {"name": builder.name, "spec": encoded},
        **extra,
    }


def _check_target(path: Path) -> None:
    if write_target(path) is not None and detect_format(path) != Format.BUNDLE:
        raise FileFormatError(
            f"{path} exists and is not a torchkeep bundle; choose another path (only a bundle "
            "is replaced)"
        )


def save_model(
    model: nn.Module,
    path: PathLike,
    *,
    example_inputs: torch.Tensor | Sequence[Any] | None = None,
    init_args: Mapping[str, Any] | None = None,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    cache: CachePolicy = "auto",
    storage_options: StorageOptions | None = None,
    transfer: Transfer | None = None,
) -> Path | str:
    """Save a whole model as a bundle directory: class, constructor arguments, weights.

    The bundle appears at ``path`` complete or not at all (an existing bundle there is
    replaced). With ``example_inputs`` it also holds ``program.pt2``, a ``torch.export``
    program with a dynamic batch dimension that runs without the model's class.

    At a URL (``s3://bucket/net.bundle``) the bundle is built in a private temporary folder
    with every check above, then uploaded under a fresh data prefix and committed by creating
    its ``manifest.json`` exclusively last; a bundle already there disappears (its manifest
    deleted) before the new one is committed, and its data is deleted after.

    Args:
        model: the model. Its class must be importable where it is loaded, unless a program
            is saved.
        path: the bundle directory to create.
        example_inputs: a tensor or a sequence of forward() arguments, batch first; any batch
            size works (batch 1 included).
        init_args: constructor keyword arguments (JSON values). Needed when the class does
            not derive from :class:`Keepable` and its ``__init__`` has required parameters.
        dynamic_shapes: ``torch.export`` dynamic shapes for the program, passed through
            (default: a dynamic batch), e.g. to keep a sequence length dynamic.
        cache: what the save leaves in the page cache, as for :func:`save_weights`
            (``"keep"``, ``"drop"`` or ``"auto"``); equally durable either way.
        storage_options: for a URL, options of its fsspec filesystem.
        transfer: for a URL, a :class:`Transfer` (part size, parallelism, retries, deadline).

    Returns:
        The bundle path (the URL, for a URL).

    Raises:
        CachePolicyError: ``cache`` names no policy.
        InitArgsError: constructor arguments are missing or not JSON (the message names them).
        ExportError: ``torch.export`` cannot export the model.
        DestinationExistsError: the URL holds a committed folder that is not a bundle.
        RemoteStorageError: an upload failed for good or the transfer's deadline passed.

    Example:
        >>> tk.save_model(model, "net.bundle", example_inputs=torch.randn(1, 3, 32, 32))
    """
    remote = remote_or_none(path, storage_options, transfer)
    if remote is not None:
        return _save_model_remote(model, remote, example_inputs, init_args, dynamic_shapes, cache)
    model = unwrap(model)  # a torch.compile'd or DDP-wrapped model is saved as the module inside
    path = Path(path)
    cache = check_cache_policy(cache)
    config = _model_config(model, init_args)
    state = model.state_dict()
    st.validate_for_save(state)
    _check_target(path)
    program = (
        export_program(model, example_inputs, dynamic_shapes=dynamic_shapes)
        if example_inputs is not None
        else None
    )
    if example_inputs is not None:
        config["example_inputs"] = _input_specs(example_inputs)
    version = _format_version(config)
    config = {"format_version": version, **config}
    unique, metadata = safetensors_payload(state)
    with staged_directory(path, overwrite=True) as staging:
        files: dict[str, FileRecord] = {
            WEIGHTS_NAME: write_tensors(staging / WEIGHTS_NAME, unique, metadata, cache=cache),
            CONFIG_NAME: write_json(staging / CONFIG_NAME, config),
        }
        if program is not None:
            torch.export.save(program, str(staging / PROGRAM_NAME))
            files[PROGRAM_NAME] = FileRecord(*hash_file(staging / PROGRAM_NAME))
        write_manifest(
            staging,
            kind=BUNDLE_KIND,
            files=files,
            model_class=config["class"],
            format_version=version,
        )
    refill_after_save(cache, [path / WEIGHTS_NAME])
    return path


def _save_model_remote(
    model: nn.Module,
    remote: Remote,
    example_inputs: torch.Tensor | Sequence[Any] | None,
    init_args: Mapping[str, Any] | None,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None,
    cache: CachePolicy,
) -> str:
    """:func:`save_model` to a URL: built locally by the same code, then committed remotely."""
    with tempfile.TemporaryDirectory(prefix="torchkeep-upload-") as folder:
        local = Path(folder) / remote.name
        save_model(
            model,
            local,
            example_inputs=example_inputs,
            init_args=init_args,
            dynamic_shapes=dynamic_shapes,
            cache=cache,
        )
        commit_folder(local, remote, replace=BUNDLE_KIND)
    return remote.url


def _input_specs(example_inputs: torch.Tensor | Sequence[Any]) -> list[dict[str, Any]]:
    """Shape and dtype of each example tensor, so tools can make inputs for the bundle later."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    return [
        {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for t in inputs
        if isinstance(t, torch.Tensor)
    ]


def example_input_specs(path: PathLike) -> list[tuple[list[int], torch.dtype]]:
    """``(shape, dtype)`` of the example inputs a bundle was saved with (empty if none).

    Raises:
        CorruptFileError: ``config.json`` breaks its schema (the message names the key; a dtype
            must be one of torch's dtype names).
    """
    return read_config(bundle_files(Path(path))).example_inputs


def _alias_target(name: str, aliases: Mapping[str, str]) -> str:
    """The class path to import for ``name``: its alias (``aliases=`` first, then
    :func:`register_alias`), validated like a class path in a bundle, or ``name`` itself."""
    if name in aliases:
        where = f"aliases={{{name!r}: ...}}"
        fix = "Give the alias an absolute class path such as 'package.module.Class'"
        return require_class_path(aliases[name], where, fix)
    return _ALIASES.get(name, name)


def _init_error(name: str, problem: str) -> InitArgsError:
    return InitArgsError(
        f"{name} cannot be built from what the bundle's {CONFIG_NAME} records (its 'init' "
        f"arguments or builder recipe: {problem}). If the class or library changed since the "
        "bundle was saved, load its weights with tk.load_weights into a model you build"
    )


def _build(
    make: Callable[[], nn.Module], name: str, device: torch.device, header: st.Header
) -> nn.Module:
    """Construct the model without initialising its weights where possible.

    Built entirely on the meta device first, the model's size is known before any memory is
    taken: a model larger than the bundle's weights file cannot be what was saved (the config
    was changed), so it is refused before it is allocated, and so is one whose non-persistent
    buffers (computed, not stored) exceed the file by more than :data:`MAX_COMPUTED_BYTES`.
    It is then built with its parameters on the meta device (buffers computed for real); its
    weights get uninitialised
    memory on ``device``, in the stored dtypes (tied weights stay tied), which the weights file
    fills. A constructor that cannot run that way is run normally on ``device``.
    """
    dtypes = {n: e.dtype for n, e in header.entries.items()}
    dtypes.update({alias: dtypes[target] for alias, target in header.aliases.items()})
    sizes = built_size(make, dtypes)
    size = None if sizes is None else sizes.stored
    stored = sum(e.nbytes for e in header.entries.values())
    if size is not None and size > stored:
        raise _init_error(
            name, f"they make a model of {size:,} bytes, but its weights file holds {stored:,}"
        )
    if sizes is not None and sizes.computed > stored + MAX_COMPUTED_BYTES:
        raise _init_error(
            name,
            f"they make a model whose non-persistent buffers (computed at build, never stored) "
            f"hold {sizes.computed:,} bytes, more than its weights file's {stored:,} plus "
            f"{MAX_COMPUTED_BYTES:,}",
        )
    try:
        model = build_without_init(make)
    except TorchkeepError:
        raise  # a recipe torchkeep itself refused (a hostile spec, a missing library)
    except Exception:
        model = None  # an __init__ that needs real weights: build it directly below
    if model is not None:
        try:
            materialise(model, device, dtypes)
        except Exception as exc:  # out of memory on the device
            raise _init_error(name, f"{type(exc).__name__}: {first_line(exc)}") from exc
        return model
    try:
        with torch.device(device):
            return make()
    except TorchkeepError:
        raise
    except Exception as exc:  # the recorded arguments do not fit the installed class
        raise _init_error(name, f"{type(exc).__name__}: {exc}") from exc


def _build_with_builder(
    path: Path, config: BundleConfig, device: torch.device, header: st.Header
) -> tuple[nn.Module, Builder]:
    """Rebuild a model from its builder's recipe, importing only installed code.

    The class the bundle names is located first, without executing anything, and refused if it
    would come from inside the bundle (the same guard as for any class); only then may the
    builder import its library. The model built must be of exactly that class.
    """
    assert config.builder is not None
    assert config.spec is not None
    builder = builder_named(config.builder, str(path / CONFIG_NAME))
    importable_module(config.class_path, path)
    spec = config.spec
    model = _build(lambda: builder.build(spec), config.class_path, device, header)
    if class_path(type(model)) != config.class_path:
        raise ModelClassNotFoundError(
            f"the {builder.name!r} builder rebuilt bundle {path} as a "
            f"{class_path(type(model))}, but its {CONFIG_NAME} names {config.class_path!r}: the "
            "installed library builds that recipe differently. Install the library version the "
            "bundle was saved with, or load its weights with tk.load_weights"
        )
    return model, builder


def _verify(path: Path) -> tuple[BundleConfig, Path]:
    """Every check that needs no import: hashes, the config's schema, unlisted entries; return
    the config and the folder holding the bundle's files."""
    manifest = read_manifest(path, kind=BUNDLE_KIND)
    problems = find_problems(path)
    if problems:
        raise ChecksumMismatchError(
            f"bundle {path} is damaged:\n  "
            + "\n  ".join(problems)
            + "\nRe-save it or restore it from a copy"
        )
    folder = files_folder(path, manifest)
    config = read_config(folder)
    unlisted = content_problems(path, manifest)
    if unlisted:
        raise UnsafeBundleError(
            f"bundle {path} holds entries its manifest does not account for:\n  "
            + "\n  ".join(unlisted)
            + f"\nIts config.json names class {config.class_path!r}; an import of it could run "
            "code shipped this way, so nothing was imported. A bundle holds only the files "
            "torchkeep wrote: remove these if you added them, otherwise the bundle was tampered "
            "with and should not be loaded"
        )
    return config, folder


def load_model(
    path: PathLike,
    *,
    map_location: torch.device | str = "cpu",
    aliases: Mapping[str, str] | None = None,
    trust_program: bool = False,
    storage_options: StorageOptions | None = None,
    transfer: Transfer | None = None,
) -> nn.Module:
    """Load a bundle saved by :func:`save_model`; never unpickles anything by default.

    Everything that needs no import is checked first: the manifest's hashes, that the bundle
    holds nothing its manifest does not list (no extra files, folders or links), and
    ``config.json`` against its schema. The class recorded there is then imported, but only
    after proving, without executing anything, that no package level of its path (and no
    ``sys.path`` entry) lies inside the bundle: this runs code *you* installed, never code
    shipped in the bundle. The model is built on the meta device where possible and its weights
    are read straight into their final memory (no second copy), then it is put in eval mode.

    When the class cannot be imported and the bundle holds ``program.pt2``, the program is
    returned instead, but only with ``trust_program=True``: ``torch.export.load`` can run code
    from the file (it unpickles parts of it), so it is used only if you trust the bundle's
    origin, and even then only after :func:`scan` finds nothing beyond torch's allowlist.
    A ``.pt2`` file may also be passed directly (with ``trust_program=True``).

    A URL (``s3://bucket/net.bundle``) is fetched first into a private temporary folder: its
    manifest, then exactly the files it lists (an object in its data prefix that the manifest
    does not list is refused as an unlisted local file is); every check above then runs on it.

    Args:
        path: the bundle directory (or a ``.pt2`` program), or its URL.
        map_location: device for the model.
        aliases: ``{"old.module.Net": "new.module.Net"}`` for classes that moved (adds to
            :func:`register_alias`).
        trust_program: allow falling back to the program when the class is missing.
        storage_options: for a URL, options of its fsspec filesystem.
        transfer: for a URL, a :class:`Transfer` (parallel reads, retries, deadline).

    Returns:
        The model in eval mode, or the program's module (a callable ``nn.Module``).

    Raises:
        ChecksumMismatchError: a file differs from the manifest.
        UnsafeBundleError: the bundle holds unlisted entries, or its class would be imported
            from inside it.
        CorruptFileError: ``config.json`` breaks its schema (the message names the key).
        ModelClassNotFoundError: the class (or an alias target) is invalid, missing or not an
            ``nn.Module`` subclass, and no trusted program is there to fall back on.

    Example:
        >>> model = tk.load_model("net.bundle")
        >>> model = tk.load_model("net.bundle", aliases={"old.Net": "new.Net"})
    """
    remote = remote_or_none(path, storage_options, transfer)
    if remote is not None:
        with fetched(remote) as local:
            return load_model(
                local, map_location=map_location, aliases=aliases, trust_program=trust_program
            )
    path = Path(path)
    device = torch.device(map_location)
    if detect_format(path) == Format.PT2:  # a missing or impossible path is a typed error here
        return _program_or_refuse(path, device, trust_program, "")
    if not path.is_dir():
        raise FileFormatError(
            f"{path} is a file, not a model bundle. A torch.save(model) pickle loads with "
            "tk.load_pickled_model(path, allow=...); weights load with tk.load_weights"
        )
    if aliases is not None and not isinstance(aliases, Mapping):
        raise ModelClassNotFoundError(
            f"aliases= must be a mapping {{old class path: new class path}}, not a "
            f"{type(aliases).__name__}"
        )
    config, folder = _verify(path)
    header = st.read_header(folder / WEIGHTS_NAME)  # verified by _verify: bounded, hashed
    if config.builder is not None:
        model, builder = _build_with_builder(path, config, device, header)
        load_weights(model, folder / WEIGHTS_NAME, map_location=device)
        if builder.tie is not None:
            builder.tie(model)
        return _cast(model, config).eval()
    target = _alias_target(config.class_path, aliases or {})
    try:
        cls = import_class(target, path)
    except ModelClassNotFoundError as exc:
        return _program_or_refuse(folder / PROGRAM_NAME, device, trust_program, str(exc))
    args, kwargs = _arguments(config.args, config.kwargs)
    model = _build(lambda: cls(*args, **kwargs), cls.__qualname__, device, header)
    load_weights(model, folder / WEIGHTS_NAME, map_location=device)
    return _cast(model, config).eval()


def _cast(model: nn.Module, config: BundleConfig) -> nn.Module:
    if config.buffer_dtype is not None:
        cast_buffers(model, config.buffer_dtype)
    return model


def _program_or_refuse(
    program: Path, device: torch.device, trust_program: bool, missing: str
) -> nn.Module:
    if trust_program and program.is_file():
        return load_program(program, map_location=device)
    if not missing:
        raise UnsafeCheckpointError(
            f"{program} is a torch.export program, and torch.export.load may execute code from "
            "the file. If you trust its origin, pass trust_program=True (it is scanned first)"
        )
    bundle = program.parent
    fixes = [
        "install or import the package that defines it",
        "if it moved, pass aliases={old: new} or call tk.register_alias(old, new)",
    ]
    if program.is_file():
        fixes.append(
            "or, if you trust where the bundle came from, pass trust_program=True to run its "
            "program.pt2 (torch.export.load may execute code from that file)"
        )
    else:
        fixes.append("(the bundle has no program: save it with example_inputs= to get one)")
    raise ModelClassNotFoundError(f"{missing} for bundle {bundle}. To fix: " + "; ".join(fixes))
