"""A static walk over one pickle: which globals it imports and which calls it would make.

The pickle virtual machine is simulated symbolically with :mod:`pickletools` (never
:mod:`pickle`): string constants, globals and memo entries are tracked so that ``STACK_GLOBAL``
names assembled from the stack or fetched back from the memo are resolved. Anything the walk
cannot resolve is reported as unresolved, which the scanner treats as dangerous.

With ``precise=True`` (for bytes that may be no pickle at all, such as the raw tensor records
of an archive), where the real unpickler certainly raises before the current opcode imports or
calls anything (a pop past the stack's bottom or its last MARK, a missing memo entry, a call of
a value built from literals, ``STACK_GLOBAL`` of such values, an extension code this process
never registered), the walk ends there too, as incomplete: random bytes end early without
spurious events, while every step an unpickler could really take is still simulated. Without
it, such steps are simulated with unknown values (and reported) as if the pickle went on.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import pickletools
import re
from dataclasses import dataclass, field
from typing import IO

_MARK = object()
_UNKNOWN = object()
_DATA = object()  # built from literals only: never callable, never a name
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
# pickletools errors where the C unpickler fails at the same byte: an unknown opcode, the data
# running out. Their texts hold no pickle data except the one opcode byte.
_DATA_ENDS = re.compile(
    r"^(?:at position \d+, opcode b.{3,6} unknown"
    r"|pickle exhausted before seeing STOP"
    r"|not enough data in stream to read \w+"
    r"|expected \d+ bytes in a \w+, but only \d+ remain"
    r"|no newline found when trying to read \w+"
    r"|\w+ byte count (?:< 0: -\d+|> sys\.maxsize: \d+))$"
)
# Text arguments pickletools parses more strictly than the C unpickler (which reads INT and
# LONG in any base strtol accepts): a precise walk goes on past them with what they push.
_TEXT_OPS = {"INT": "data", "LONG": "data", "FLOAT": "data", "STRING": "unknown"}
# Text arguments both parse alike (base 10, the same parser): a failure is the unpickler's too.
_BASE10_OPS = frozenset({"GET", "PUT"})
_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
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
    # The walk ended where the C unpickler certainly raises too (an unknown opcode, the data
    # running out, an invalid UTF-8 string, or a precise-mode failure), not merely where
    # pickletools parses more strictly than the unpickler (a text number, a quoted string).
    unpickler_fails: bool = False


class _Fails(Exception):
    """The real unpickler raises at this opcode, before it imports or calls anything."""


def normalise(module: str, name: str) -> Global:
    """Apply the Python 2 name mapping ``pickle`` applies (``__builtin__`` -> ``builtins``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return Global(module, name)


class _Machine:
    """The symbolic stack and memo of one pickle."""

    def __init__(self, result: WalkResult, precise: bool) -> None:
        self.result = result
        self.precise = precise
        self.stack: list[object] = []
        self.memo: dict[int, object] = {}

    def fail(self, reason: str) -> object:
        """Where the unpickler raises: end a precise walk, else go on with an unknown value."""
        if self.precise:
            raise _Fails(reason)
        return _UNKNOWN

    def pop(self) -> object:
        if self.stack and (self.stack[-1] is not _MARK or not self.precise):
            return self.stack.pop()
        return self.fail("stack underflow")

    def pop_mark(self) -> list[object]:
        items: list[object] = []
        while self.stack:
            item = self.stack.pop()
            if item is _MARK:
                items.reverse()
                return items
            items.append(item)
        self.fail("no MARK on the stack")
        items.reverse()
        return items

    def top(self) -> object:
        if self.stack and (self.stack[-1] is not _MARK or not self.precise):
            return self.stack[-1]
        return self.fail("stack underflow")

    def emit(self, kind: str, target: object, offset: int, detail: str = "") -> None:
        resolved = target if isinstance(target, Global) else None
        if resolved is None and kind != "unresolved":
            kind, detail = "unresolved", detail or f"a {kind} of a value computed at load time"
        self.result.events.append(Event(kind, resolved, offset, detail))

    def call(self, callee: object, offset: int, how: str) -> None:
        if _is_data(callee):
            self.fail(f"{how} of a value that is not callable")
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
            if attr_value is _DATA or module_value is _DATA:
                self.fail("STACK_GLOBAL of values that are not strings")
            if isinstance(module_value, str) and isinstance(attr_value, str):
                target = normalise(module_value, attr_value)
                self.emit("global", target, offset)
                self.stack.append(target)
            else:
                self.emit("unresolved", None, offset, "STACK_GLOBAL with a name built at load time")
                self.stack.append(_UNKNOWN)
        elif name in _EXT_OPS:
            self.extension(name, arg, offset)
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
            key = int(arg)  # type: ignore[call-overload]
            found = self.memo[key] if key in self.memo else self.fail(f"no memo entry {key}")
            self.stack.append(found)
        elif name == "DUP":
            self.stack.append(self.top())
        elif name == "MARK":
            self.stack.append(_MARK)
        elif name == "POP" and self.precise and self.stack and self.stack[-1] is _MARK:
            self.stack.pop()  # the C unpickler's POP drops a MARK on top
        else:
            self.generic(op)

    def extension(self, name: str, code: object, offset: int) -> None:
        """EXT1/2/4: a global from copyreg's registry (the one this process has)."""
        registry = getattr(copyreg, "_inverted_registry", None)
        if not self.precise or not isinstance(registry, dict):
            self.emit(
                "unresolved", None, offset, f"{name} imports a global from copyreg's registry"
            )
            self.stack.append(_UNKNOWN)
            return
        key = registry.get(code)
        if key is None:
            raise _Fails(f"extension code {code} is not registered")
        target = normalise(*key)
        self.emit("global", target, offset)
        self.stack.append(target)

    def generic(self, op: pickletools.OpcodeInfo) -> None:
        """Apply an opcode's documented stack effect.

        What it pushes is data when the opcode builds a plain value (not ``anyobject``) from
        nothing but data and strings; otherwise it is unknown.
        """
        before = op.stack_before
        if pickletools.markobject in before:
            consumed = self.pop_mark()
            consumed += [self.pop() for _ in range(before.index(pickletools.markobject))]
        else:
            consumed = [self.pop() for _ in before]
        plain = all(_is_data(item) for item in consumed)
        for item in op.stack_after:
            if item is pickletools.markobject:
                self.stack.append(_MARK)
            elif item is not pickletools.anyobject and plain:
                self.stack.append(_DATA)
            else:
                self.stack.append(_UNKNOWN)


def _is_data(value: object) -> bool:
    return value is _DATA or isinstance(value, str)


def walk(stream: IO[bytes], *, precise: bool = False) -> WalkResult:
    """Walk one pickle from the stream's position up to and including its ``STOP``.

    The stream is left just after ``STOP`` (or wherever parsing failed). Parsing errors do not
    raise: they are recorded in :attr:`WalkResult.error` with the events seen before them.
    With ``precise``, the walk also ends where the unpickler would raise (see module doc), and
    goes on past text arguments the unpickler may accept though pickletools does not.
    """
    result = WalkResult()
    machine = _Machine(result, precise)
    while True:
        start = stream.tell()
        try:
            for op, arg, offset in pickletools.genops(stream):
                if op.name == "STOP":
                    result.complete = True
                    return result
                machine.step(op, arg, offset if offset is not None else -1)
                start = stream.tell()
        except _Fails as exc:
            result.error = f"the unpickler fails here: {exc}"
            result.unpickler_fails = True
            return result
        except Exception as exc:  # genops raises ValueError, UnicodeDecodeError, struct.error, ...
            if precise and _skip_text_argument(stream, start, machine):
                continue
            result.error = f"{type(exc).__name__}: {exc}"
            failing = _failing_op(stream, start)
            result.unpickler_fails = (
                isinstance(exc, UnicodeDecodeError)
                or bool(_DATA_ENDS.match(str(exc)))
                or (precise and failing is not None and failing.name in _BASE10_OPS)
            )
            return result


def _failing_op(stream: IO[bytes], start: int) -> pickletools.OpcodeInfo | None:
    stream.seek(start)
    return _OPCODES.get(stream.read(1))


def _skip_text_argument(stream: IO[bytes], start: int, machine: _Machine) -> bool:
    """After a text argument pickletools rejected at ``start``, go on as if it was accepted."""
    op = _failing_op(stream, start)
    if op is None or op.name not in _TEXT_OPS or not stream.readline().endswith(b"\n"):
        stream.seek(start)
        return False
    machine.stack.append(_DATA if _TEXT_OPS[op.name] == "data" else _UNKNOWN)
    return True
