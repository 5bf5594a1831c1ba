"""How dangerous each global a pickle names is.

``SAFE``: torch's own weights-only allowlist (tensor rebuild helpers, storages, dtypes, a few
containers). ``TORCH_LAYER``: ``torch.nn`` module classes, accepted by
:func:`~torchkeep.load_pickled_model` without being listed. ``USER``: anything else that is not
known to be dangerous (the user's own classes); loading needs an explicit ``allow=``.
``DANGEROUS``: code execution, file, process, network or interpreter access, torch internals
outside the allowlist, and every name that cannot be resolved statically.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import sys

from torch import nn

from .walker import Global, WalkLimits


class Severity(str, enum.Enum):
    """How much trust loading a global needs, from none to refuse."""

    SAFE = "safe"
    TORCH_LAYER = "torch-layer"
    USER = "user"
    DANGEROUS = "dangerous"


# Modules (and their submodules) whose globals give code, process, file, network or
# interpreter access, or unpickle again.
DANGEROUS_MODULES = frozenset(
    {
        "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "builtins", "runpy",
        "pickle", "_pickle", "cPickle", "pickletools", "copyreg", "shelve", "marshal", "dill",
        "cloudpickle", "joblib", "importlib", "imp", "zipimport", "pkgutil", "site",
        "sysconfig", "shutil", "tempfile", "pathlib", "glob", "io", "_io", "fileinput",
        "socket", "ssl", "select", "selectors", "asyncio", "http", "urllib", "urllib3",
        "requests", "httpx", "ftplib", "telnetlib", "smtplib", "poplib", "imaplib",
        "xmlrpc", "webbrowser", "ctypes", "_ctypes", "cffi", "code", "codeop", "compileall",
        "py_compile", "pty", "tty", "signal", "resource", "multiprocessing", "threading",
        "_thread", "concurrent", "types", "operator", "_operator", "functools", "inspect",
        "gc", "weakref", "ast", "dis", "timeit", "trace", "pdb", "bdb", "profile", "cProfile",
        "platform", "getpass", "venv", "ensurepip", "pip", "setuptools", "distutils",
        "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.lib.npyio", "numpy.load",
        "pydoc", "doctest", "unittest", "logging", "mmap", "fcntl", "sqlite3", "dbm",
    }
)  # fmt: skip
_BUILTIN_TYPES = frozenset(
    {"object", "dict", "list", "tuple", "int", "float", "str", "bytes", "bool", "frozenset",
     "slice", "range"}
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _allowlist() -> frozenset[str]:
    """Names torch's weights-only unpickler accepts by itself (not the user's additions), and
    the plain builtins a newer torch accepts (torchkeep.compat adds them under an older one)."""
    from torch import _weights_only_unpickler

    from ..compat import NEWER_WEIGHTS_ONLY_GLOBALS

    return frozenset(_weights_only_unpickler._get_allowed_globals()) | frozenset(
        NEWER_WEIGHTS_ONLY_GLOBALS
    )


def resolve_loaded(target: Global) -> object | None:
    """The object a global names, looked up only in modules already imported (never imports)."""
    obj: object | None = sys.modules.get(target.module)
    for part in target.name.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj


def _in_module(module: str, prefixes: frozenset[str]) -> bool:
    parts = module.split(".")
    return any(".".join(parts[: i + 1]) in prefixes for i in range(len(parts)))


def is_torch_layer(target: Global) -> bool:
    """True for a class of torch's own ``torch.nn`` modules (``Conv2d``, ``Linear``, ...)."""
    if not target.module.startswith("torch.nn."):
        return False
    obj = resolve_loaded(target)
    return (
        isinstance(obj, type)
        and issubclass(obj, nn.Module)
        and obj.__module__ == target.module
        and obj.__qualname__ == target.name
    )


def classify(target: Global) -> tuple[Severity, str]:
    """Severity of importing ``target`` and a short reason for people."""
    full = target.full_name
    attributes = target.name.split(".")
    if any(a.startswith("__") and a.endswith("__") for a in attributes[1:]):
        return Severity.DANGEROUS, "reaches a dunder attribute (a way to get at code objects)"
    if full in _allowlist():
        return Severity.SAFE, "in torch's weights-only allowlist"
    if target.module == "builtins" and target.name in _BUILTIN_TYPES:
        return Severity.USER, "a builtin type outside torch's allowlist"
    if _in_module(target.module, DANGEROUS_MODULES) or _in_module(full, DANGEROUS_MODULES):
        return Severity.DANGEROUS, f"{target.module} gives code, file, process or network access"
    if target.module == "torch" or target.module.startswith("torch."):
        if is_torch_layer(target):
            return Severity.TORCH_LAYER, "a torch.nn layer class"
        if target.module.startswith("torch.nn."):
            return Severity.USER, "a torch.nn object that is not a layer class"
        return Severity.DANGEROUS, "a torch internal outside the weights-only allowlist"
    return Severity.USER, "not torch's; needs allow= to load"


@dataclasses.dataclass(frozen=True)
class ScanLimits:
    """Caps that bound the memory and time of reading an untrusted archive or pickle.

    Attributes:
        max_ratio: how many times its compressed size a compressed member may expand to...
        ratio_floor: ...once it expands beyond this many bytes (small members never trip it).
        max_member: bytes of any one member that is read (a pickle, a nested zip).
        max_document: bytes of a JSON document that is parsed whole (a ``.pt2`` program).
        max_depth: zips inside zips.
        max_pickles: pickles walked in one file (members and pickles in sequence together).
        spool: nested zips larger than this are copied to a temporary file, not kept in memory.
        walk: the caps of one pickle walk (symbolic values, opcodes).
    """

    max_ratio: int = 200
    ratio_floor: int = 16 << 20
    max_member: int = 4 << 30
    max_document: int = 64 << 20
    max_depth: int = 3
    max_pickles: int = 10_000
    spool: int = 16 << 20
    walk: WalkLimits = dataclasses.field(default_factory=WalkLimits)


LIMITS = ScanLimits()
