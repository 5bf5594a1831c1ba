"""Model bundles: a directory holding a model's class, constructor arguments and weights (and
optionally its program), written atomically with a manifest of content hashes. No pickle."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import (
    ChecksumMismatchError,
    FileFormatError,
    InitArgsError,
    ModelClassNotFoundError,
    UnsafeBundleError,
    UnsafeCheckpointError,
    first_line,
)
from ..formats import Format, detect_format
from ..formats import safetensors as st
from ..hashing import hash_file
from ..manifest import (
    FileRecord,
    find_problems,
    read_manifest,
    write_json,
    write_manifest,
    write_tensors,
)
from ..paths import write_target
from ..storage.local import staged_directory
from ..unwrap import unwrap
from ..weights import load_weights, safetensors_payload
from .capture import captured_init_args, decode, encode, required_parameters
from .classpath import import_class, require_class_path
from .config import BundleConfig, read_config
from .layout import BUNDLE_KIND, CONFIG_NAME, PROGRAM_NAME, WEIGHTS_NAME, content_problems
from .program import export_program, load_program

_ALIASES: dict[str, str] = {}
PathLike = str | os.PathLike[str]


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
                + "} to save_model, or derive the class from tk.Keepable to record them"
            )
    return config


def _check_rebuilds(model: nn.Module, init: Mapping[str, Any]) -> None:
    """Raise if the recorded arguments would build a model whose weights do not fit."""
    cls = type(model)
    try:
        with torch.device("meta"):
            rebuilt = cls(*decode(init["args"]), **decode(init["kwargs"]))
    except Exception:
        return  # cannot be built on the meta device; load_model builds it directly
    stored = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fresh = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if stored != fresh:
        differing = sorted(set(stored) ^ set(fresh)) or [k for k in stored if stored[k] != fresh[k]]
        raise InitArgsError(
            f"{cls.__qualname__}(*{init['args']}, **{init['kwargs']}) would not rebuild this "
            f"model (its weights differ in {', '.join(differing[:5])}): the constructor "
            "arguments it was built with were not recorded. Pass init_args= to save_model, or "
            "derive the class from tk.Keepable"
        )


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
) -> Path:
    """Save a whole model as a bundle directory: class, constructor arguments, weights.

    The bundle appears at ``path`` complete or not at all (an existing bundle there is
    replaced). With ``example_inputs`` it also holds ``program.pt2``, a ``torch.export``
    program with a dynamic batch dimension that runs without the model's class.

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

    Returns:
        The bundle path.

    Raises:
        InitArgsError: constructor arguments are missing or not JSON (the message names them).
        ExportError: ``torch.export`` cannot export the model.

    Example:
        >>> tk.save_model(model, "net.bundle", example_inputs=torch.randn(1, 3, 32, 32))
    """
    model = unwrap(model)  # a torch.compile'd or DDP-wrapped model is saved as the module inside
    path = Path(path)
    init = _init_config(model, init_args)
    _check_rebuilds(model, init)
    state = model.state_dict()
    st.validate_for_save(state)
    _check_target(path)
    program = (
        export_program(model, example_inputs, dynamic_shapes=dynamic_shapes)
        if example_inputs is not None
        else None
    )
    config: dict[str, Any] = {"class": class_path(type(model)), "init": init}
    if example_inputs is not None:
        config["example_inputs"] = _input_specs(example_inputs)
    unique, metadata = safetensors_payload(state)
    with staged_directory(path, overwrite=True) as staging:
        files: dict[str, FileRecord] = {
            WEIGHTS_NAME: write_tensors(staging / WEIGHTS_NAME, unique, metadata),
            CONFIG_NAME: write_json(staging / CONFIG_NAME, config),
        }
        if program is not None:
            torch.export.save(program, str(staging / PROGRAM_NAME))
            files[PROGRAM_NAME] = FileRecord(*hash_file(staging / PROGRAM_NAME))
        write_manifest(staging, kind=BUNDLE_KIND, files=files, model_class=config["class"])
    return path


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
    return read_config(Path(path)).example_inputs


def _alias_target(name: str, aliases: Mapping[str, str]) -> str:
    """The class path to import for ``name``: its alias (``aliases=`` first, then
    :func:`register_alias`), validated like a class path in a bundle, or ``name`` itself."""
    if name in aliases:
        where = f"aliases={{{name!r}: ...}}"
        fix = "Give the alias an absolute class path such as 'package.module.Class'"
        return require_class_path(aliases[name], where, fix)
    return _ALIASES.get(name, name)


def _tie_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, name))
    return [group for group in owners.values() if len(group) > 1]


def _init_error(cls: type[nn.Module], problem: str) -> InitArgsError:
    return InitArgsError(
        f"{cls.__qualname__} cannot be built from the 'init' arguments in the bundle's "
        f"{CONFIG_NAME} ({problem}). If the class changed since the bundle was saved, load its "
        "weights with tk.load_weights into a model you build"
    )


def _build(
    cls: type[nn.Module], config: BundleConfig, device: torch.device, weight_bytes: int
) -> nn.Module:
    """Construct the model without initialising weights twice where possible (meta device).

    Built on the meta device first, the model's size is known before any memory is taken: a
    model larger than the ``weight_bytes`` the bundle's weights file holds cannot be what was
    saved (the config's arguments were changed), so it is refused before it is allocated.
    """
    args, kwargs = config.args, config.kwargs
    try:
        with torch.device("meta"):
            model = cls(*args, **kwargs)
    except Exception:
        model = None  # an __init__ that needs real tensors: build it directly below
    if model is not None:
        persistent = set(model.state_dict())
        all_meta = all(t.is_meta for t in [*model.parameters(), *model.buffers()])
        non_persistent = any(n not in persistent for n, _ in model.named_buffers())
        if all_meta and not non_persistent:
            tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
            size = sum(t.numel() * t.element_size() for t in tensors)
            if size > weight_bytes:
                raise _init_error(
                    cls,
                    f"they make a model of {size:,} bytes, but its weights file holds "
                    f"{weight_bytes:,}",
                )
            ties = _tie_groups(model)
            try:
                model.to_empty(device=device)
            except Exception as exc:  # out of memory on the device
                raise _init_error(cls, f"{type(exc).__name__}: {first_line(exc)}") from exc
            for (first, first_name), *others in ties:
                for module, name in others:
                    module._parameters[name] = first._parameters[first_name]
            return model
    try:
        with torch.device(device):
            return cls(*args, **kwargs)
    except Exception as exc:  # the recorded arguments do not fit the installed class
        raise _init_error(cls, f"{type(exc).__name__}: {exc}") from exc


def _verify(path: Path) -> BundleConfig:
    """Every check that needs no import: hashes, the config's schema, unlisted entries."""
    manifest = read_manifest(path, kind=BUNDLE_KIND)
    problems = find_problems(path)
    if problems:
        raise ChecksumMismatchError(
            f"bundle {path} is damaged:\n  "
            + "\n  ".join(problems)
            + "\nRe-save it or restore it from a copy"
        )
    config = read_config(path)
    unlisted = content_problems(path, manifest["files"])
    if unlisted:
        raise UnsafeBundleError(
            f"bundle {path} holds entries its manifest does not account for:\n  "
            + "\n  ".join(unlisted)
            + f"\nIts config.json names class {config.class_path!r}; an import of it could run "
            "code shipped this way, so nothing was imported. A bundle holds only the files "
            "torchkeep wrote: remove these if you added them, otherwise the bundle was tampered "
            "with and should not be loaded"
        )
    return config


def load_model(
    path: PathLike,
    *,
    map_location: torch.device | str = "cpu",
    aliases: Mapping[str, str] | None = None,
    trust_program: bool = False,
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

    Args:
        path: the bundle directory (or a ``.pt2`` program).
        map_location: device for the model.
        aliases: ``{"old.module.Net": "new.module.Net"}`` for classes that moved (adds to
            :func:`register_alias`).
        trust_program: allow falling back to the program when the class is missing.

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
    config = _verify(path)
    target = _alias_target(config.class_path, aliases or {})
    try:
        cls = import_class(target, path)
    except ModelClassNotFoundError as exc:
        return _program_or_refuse(path / PROGRAM_NAME, device, trust_program, str(exc))
    header = st.read_header(path / WEIGHTS_NAME)  # verified by _verify: bounded, hashed
    model = _build(cls, config, device, sum(e.nbytes for e in header.entries.values()))
    load_weights(model, path / WEIGHTS_NAME, map_location=device)
    return model.eval()


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
