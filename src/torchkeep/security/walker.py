"""A static walk over one pickle: which globals it imports and which calls it would make.

The pickle virtual machine is simulated symbolically with :mod:`pickletools` (never
:mod:`pickle`): string constants, globals and memo entries are tracked so that ``STACK_GLOBAL``
names assembled from the stack or fetched back from the memo are resolved. Anything the walk
cannot resolve is reported as unresolved, which the scanner treats as dangerous.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
from dataclasses import dataclass, field
from typing import IO

_MARK = object()
_UNKNOWN = object()
_STRING_OPS = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
    }
)
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
UNRESOLVED = "<unresolved>"


@dataclass(frozen=True)
class Global:
    """A global the pickle imports: ``module`` and (possibly dotted) ``name``."""

    module: str
    name: str

    @property
    def full_name(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class Event:
    """One thing loading the pickle would do: import a global or call something."""

    kind: str  # "global" (an import), "call" (REDUCE/NEWOBJ/OBJ/INST) or "unresolved"
    target: Global | None  # None when the target cannot be determined statically
    offset: int
    detail: str = ""


@dataclass
class WalkResult:
    """Events of one pickle, whether it reached ``STOP``, and its protocol."""

    events: list[Event] = field(default_factory=list)
    complete: bool = False
    protocol: int = 0
    error: str = ""


def normalise(module: str, name: str) -> Global:
    """Apply the Python 2 name mapping ``pickle`` applies (``__builtin__`` -> ``builtins``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return Global(module, name)


class _Machine:
    """The symbolic stack and memo of one pickle."""

    def __init__(self, result: WalkResult) -> None:
        self.result = result
        self.stack: list[object] = []
        self.memo: dict[int, object] = {}

    def pop(self) -> object:
        return self.stack.pop() if self.stack else _UNKNOWN

    def pop_mark(self) -> list[object]:
        items: list[object] = []
        while self.stack:
            item = self.stack.pop()
            if item is _MARK:
                break
            items.append(item)
        items.reverse()
        return items

    def top(self) -> object:
        return self.stack[-1] if self.stack else _UNKNOWN

    def emit(self, kind: str, target: object, offset: int, detail: str = "") -> None:
        resolved = target if isinstance(target, Global) else None
        if resolved is None and kind != "unresolved":
            kind, detail = "unresolved", detail or f"a {kind} of a value computed at load time"
        self.result.events.append(Event(kind, resolved, offset, detail))

    def call(self, callee: object, offset: int, how: str) -> None:
        self.emit("call", callee, offset, how)
        self.stack.append(_UNKNOWN)

    def step(self, op: pickletools.OpcodeInfo, arg: object, offset: int) -> None:
        name = op.name
        if name == "PROTO":
            self.result.protocol = int(arg)  # type: ignore[call-overload]
        elif name in _STRING_OPS:
            self.stack.append(arg if isinstance(arg, str) else _UNKNOWN)
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            target = normalise(module, attr)
            self.emit("global", target, offset)
            if name == "INST":
                self.pop_mark()
                self.call(target, offset, "INST")
            else:
                self.stack.append(target)
        elif name == "STACK_GLOBAL":
            attr_value, module_value = self.pop(), self.pop()
            if isinstance(module_value, str) and isinstance(attr_value, str):
                target = normalise(module_value, attr_value)
                self.emit("global", target, offset)
                self.stack.append(target)
            else:
                self.emit("unresolved", None, offset, "STACK_GLOBAL with a name built at load time")
                self.stack.append(_UNKNOWN)
        elif name in _EXT_OPS:
            self.emit(
                "unresolved", None, offset, f"{name} imports a global from copyreg's registry"
            )
            self.stack.append(_UNKNOWN)
        elif name == "REDUCE":
            self.pop()
            self.call(self.pop(), offset, "REDUCE")
        elif name == "NEWOBJ":
            self.pop()
            self.call(self.pop(), offset, "NEWOBJ")
        elif name == "NEWOBJ_EX":
            self.pop()
            self.pop()
            self.call(self.pop(), offset, "NEWOBJ_EX")
        elif name == "OBJ":
            items = self.pop_mark()
            self.call(items[0] if items else _UNKNOWN, offset, "OBJ")
        elif name in _PUT_OPS:
            self.memo[int(arg)] = self.top()  # type: ignore[call-overload]
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in _GET_OPS:
            self.stack.append(self.memo.get(int(arg), _UNKNOWN))  # type: ignore[call-overload]
        elif name == "DUP":
            self.stack.append(self.top())
        elif name == "MARK":
            self.stack.append(_MARK)
        else:
            self.generic(op)

    def generic(self, op: pickletools.OpcodeInfo) -> None:
        """Apply an opcode's documented stack effect, pushing unknown values."""
        before = op.stack_before
        if pickletools.markobject in before:
            self.pop_mark()
            for _ in range(before.index(pickletools.markobject)):
                self.pop()
        else:
            for _ in before:
                self.pop()
        for item in op.stack_after:
            self.stack.append(_MARK if item is pickletools.markobject else _UNKNOWN)


def walk(stream: IO[bytes]) -> WalkResult:
    """Walk one pickle from the stream's position up to and including its ``STOP``.

    The stream is left just after ``STOP`` (or wherever parsing failed). Parsing errors do not
    raise: they are recorded in :attr:`WalkResult.error` with the events seen before them.
    """
    result = WalkResult()
    machine = _Machine(result)
    try:
        for op, arg, offset in pickletools.genops(stream):
            if op.name == "STOP":
                result.complete = True
                break
            machine.step(op, arg, offset if offset is not None else -1)
    except Exception as exc:  # genops raises ValueError, UnicodeDecodeError, struct.error, ...
        result.error = f"{type(exc).__name__}: {exc}"
    return result
