"""Turning the class path a bundle names into a class, importing only code the user installed.

A bundle names its model class as ``package.module.Class``. Importing that name naively runs
whatever module Python finds first, and when the current folder (or any ``sys.path`` entry)
holds the bundle, that can be a module shipped *inside* the bundle. So before anything is
imported, every package level of the name is resolved the way the import system would resolve
it, without executing code (modules already imported are taken from ``sys.modules``, the rest
from the ``sys.meta_path`` finders' ``find_spec`` with the parent's search locations), and the
name is refused if any level's file or search location lies inside the bundle. Paths are
compared by device and inode after resolving symlinks, so case-insensitive file systems, bind
mounts and links cannot disguise a location.
"""

from __future__ import annotations

import importlib
import keyword
import os
import sys
from collections.abc import Iterable, Iterator
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from ..errors import ModelClassNotFoundError, UnsafeBundleError
from .layout import walk

MAX_CLASS_PATH = 1024


def class_path_problem(value: object) -> str | None:
    """Why ``value`` is not an absolute ``module.Class`` path (None when it is one).

    Refused: non-strings, empty or overlong strings, relative paths (``.Net``, ``..x.Net``),
    parts that are not identifiers or are keywords, and dunder parts (``x.__class__``) other
    than a leading ``__main__`` (a class saved from a script).
    """
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not a string"
    if not value or len(value) > MAX_CLASS_PATH:
        return f"it has {len(value)} characters (1 to {MAX_CLASS_PATH} allowed)"
    parts = value.split(".")
    if len(parts) < 2:
        return "it names no module (expected module.Class)"
    if not parts[0]:
        return "it is relative (starts with '.'); only absolute module paths are imported"
    for index, part in enumerate(parts):
        if not part.isidentifier() or keyword.iskeyword(part) or not part.isascii():
            return f"part {part!r} is not a Python identifier"
        if part.startswith("__") and part.endswith("__") and (index, part) != (0, "__main__"):
            return f"part {part!r} is a dunder name; only modules and classes are looked up"
    return None


def require_class_path(value: object, where: str, fix: str) -> str:
    """``value`` if it is a valid class path, else :class:`ModelClassNotFoundError`."""
    problem = class_path_problem(value)
    if problem is None and isinstance(value, str):
        return value
    raise ModelClassNotFoundError(
        f"{where} names class {value!r:.200}, which is not a valid class path: {problem}. {fix}"
    )


def _identity(path: str | os.PathLike[str], *, follow: bool = True) -> tuple[int, int] | None:
    try:
        st = os.stat(path, follow_symlinks=follow)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


class _Root:
    """A directory whose inside must not be imported from, compared by device and inode (the
    directory itself, and every entry in it, so a hard link to one of its files counts too)."""

    def __init__(self, directory: Path) -> None:
        identity = _identity(directory)
        if identity is None:
            raise UnsafeBundleError(f"bundle {directory} cannot be examined (stat failed)")
        self.identity = identity
        self.entries = {_identity(p, follow=False) for p in walk(directory)} - {None}

    def contains(self, location: str) -> bool:
        """True if ``location`` (symlinks resolved) is the directory, an entry of it (or a hard
        link to one) or lies inside it."""
        try:
            real = Path(os.path.realpath(location or os.getcwd()))
        except ValueError:  # a NUL byte: the import system cannot use this location either
            return False
        if _identity(real) in self.entries:
            return True
        return any(_identity(p) == self.identity for p in (real, *real.parents))


def _search_locations(spec: ModuleSpec) -> list[str] | None:
    """A package spec's search locations (None for a plain module)."""
    locations = spec.submodule_search_locations
    return None if locations is None else [str(p) for p in locations]


def _locations_of_spec(spec: ModuleSpec) -> list[str]:
    found = [spec.origin] if spec.origin and spec.has_location else []
    return found + (_search_locations(spec) or [])


def _locations_of_module(module: ModuleType) -> list[str]:
    found = [str(f) for f in (getattr(module, "__file__", None),) if isinstance(f, str)]
    spec = getattr(module, "__spec__", None)
    if isinstance(spec, ModuleSpec):
        found += _locations_of_spec(spec)
    path = getattr(module, "__path__", None)
    if isinstance(path, Iterable) and not isinstance(path, str | bytes):
        found += [str(p) for p in path]
    return found


def _entry_finder(entry: str) -> Any:
    """The path-entry finder ``sys.path_hooks`` give ``entry`` (a fresh one, never cached)."""
    for hook in sys.path_hooks:
        try:
            return hook(entry)
        except ImportError:
            continue
    return None


def _path_spec(name: str, search: list[str] | None) -> ModuleSpec | None:
    """What ``PathFinder.find_spec`` returns, rebuilt from the path-entry finders.

    ``PathFinder`` itself cannot be asked about ``a.b`` when ``a`` is a namespace package that
    was not imported (it looks the parent up in ``sys.modules``); the entry finders can.
    """
    portions: list[str] = []
    for entry in sys.path if search is None else search:
        if not isinstance(entry, str):
            continue
        finder = _entry_finder(entry or os.getcwd())
        find_spec = getattr(finder, "find_spec", None)
        spec: ModuleSpec | None = find_spec(name) if find_spec is not None else None
        if spec is None:
            continue
        if spec.loader is not None:
            return spec
        portions += [str(p) for p in spec.submodule_search_locations or ()]
    if not portions:
        return None
    namespace = ModuleSpec(name, None, is_package=True)
    namespace.submodule_search_locations = portions
    return namespace


def _find_spec(name: str, search: list[str] | None) -> ModuleSpec | None:
    """The spec the import system would use for ``name``, found without executing it."""
    for finder in sys.meta_path:
        if finder is PathFinder:
            spec = _path_spec(name, search)
        elif hasattr(finder, "find_spec"):
            try:
                spec = finder.find_spec(name, search, None)
            except Exception:  # an installed finder failed; the real import would raise too
                continue
        else:
            continue
        if spec is not None:
            return spec
    return None


def _levels(module_path: str) -> Iterator[tuple[str, list[str]]]:
    """Each package level of ``module_path`` that exists, with its file and search locations.

    Stops at the first level that does not exist or is not a package (the rest of the path
    are attributes).
    """
    parts = module_path.split(".")
    search: list[str] | None = None
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        module = sys.modules.get(name)
        if module is not None:
            locations = _locations_of_module(module)
            package_path = getattr(module, "__path__", None)
            children = None if package_path is None else [str(p) for p in package_path]
        else:
            spec = _find_spec(name, search)
            if spec is None:
                return
            locations = _locations_of_spec(spec)
            children = (
                None
                if spec.submodule_search_locations is None
                else list(map(str, spec.submodule_search_locations))
            )
        yield name, locations
        if children is None:
            return
        search = children


def _refuse(target: str, bundle: Path, where: str, what: str) -> UnsafeBundleError:
    return UnsafeBundleError(
        f"bundle {bundle} names class {target!r}, but {what} {where}, which is inside the "
        "bundle; torchkeep never imports code shipped in a bundle. To fix: install the package "
        "that defines the class and load the bundle from a folder that is not on sys.path "
        "(not the bundle's own parent when the bundle's name is the class's package); if you "
        "did not write this bundle, do not load it"
    )


def importable_module(target: str, bundle: Path) -> str | None:
    """The deepest module of ``target`` that an import would load, after proving that no
    level of it (and no ``sys.path`` entry) lies inside ``bundle``; None if none exists.

    Finding a spec reads directories but executes nothing, so every level is resolved even
    past one inside the bundle, to name the deepest file an import would have run.

    Raises:
        UnsafeBundleError: some level would be imported from inside the bundle.
    """
    root = _Root(bundle)
    inside: dict[str, str] = {}
    deepest = None
    for name, locations in _levels(target.rpartition(".")[0]):
        found = [location for location in locations if root.contains(location)]
        if found:
            inside[name] = found[0]
        deepest = name
    if inside:
        name, location = list(inside.items())[-1]
        raise _refuse(target, bundle, location, f"module {name!r} would be imported from")
    for entry in sys.path:
        if isinstance(entry, str) and root.contains(entry):
            shown = entry or f"'' (the current folder, {os.getcwd()})"
            raise _refuse(target, bundle, shown, "sys.path holds")
    return deepest


def import_class(target: str, bundle: Path) -> type[nn.Module]:
    """Import the class ``target`` names (checked by :func:`importable_module` first).

    Raises:
        UnsafeBundleError: the class would be imported from inside ``bundle``.
        ModelClassNotFoundError: no such module or attribute, or it is not an nn.Module subclass.
    """
    module_name = importable_module(target, bundle)
    if module_name is None:
        raise ModelClassNotFoundError(f"class {target!r} cannot be imported (no such module)")
    try:
        # Only installed code: importable_module proved no level lies inside the bundle.
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the user's installed module failed to import
        raise ModelClassNotFoundError(
            f"class {target!r} cannot be imported: importing {module_name!r} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for part in target[len(module_name) + 1 :].split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelClassNotFoundError(
                f"class {target!r} cannot be imported ({module_name!r} has no {part!r})"
            )
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelClassNotFoundError(
            f"{target!r} is a {type(obj).__name__}, not an nn.Module subclass; a bundle must "
            "name its model's class. Re-save the bundle with tk.save_model"
        )
    return obj
