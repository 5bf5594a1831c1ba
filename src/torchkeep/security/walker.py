"""A static walk over pickles: which globals they import and which calls they would make.

The pickle virtual machine is simulated symbolically on the raw bytes (never with :mod:`pickle`,
and without :mod:`pickletools`, whose bare iteration is no faster than this whole walk; runs of
plain values are skipped with one regex match): string constants, globals, small
tuples and memo entries are tracked so that ``STACK_GLOBAL`` names assembled from the stack or
fetched back from the memo are resolved, and so that the storages a ``torch.save`` pickle
declares (its persistent ids) can be checked against the records that hold them.

The walk stops exactly where a real unpickler would raise (an unknown opcode, a stack
underflow, a memo entry never stored, a call of a value that is plain data such as a number or
a string), so bytes that are not a pickle do not produce imaginary findings; and only there:
where some unpickler might go on (a very long line, a number in an unusual base), the walk goes
on too, since stopping early could miss what runs next. Anything the walk cannot resolve is
reported as unresolved, which the scanner treats as dangerous.

Memory is bounded whatever the input: the stream is read in chunks, long arguments are skipped
rather than kept, and the symbolic stack and memo are capped (:class:`WalkLimits`); exceeding a
cap raises :class:`~torchkeep.errors.ResourceLimitError`.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import copyreg
import re
import struct
import warnings
from dataclasses import dataclass, field, replace
from typing import IO

from ..errors import ResourceLimitError

UNRESOLVED = "<unresolved>"
_CHUNK = 1 << 20  # bytes read from the stream at a time
_KEPT_STRING = 256  # longer strings are skipped (never needed as a module or attribute name)
_KEPT_TUPLE = 8  # longer tuples are plain data (a persistent id has five items)
_LINE_LIMIT = 4096  # a protocol-0 line (a number, a string, a global name) longer than this
_PAD = bytes(16)
_TRUNCATED = "the pickle is truncated"
_U32 = struct.Struct("<I").unpack
_I32 = struct.Struct("<i").unpack
_U64 = struct.Struct("<Q").unpack


class _Symbol:
    """A value the walk knows only by kind."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_DATA = _Symbol("<data>")  # a number, bytes, None, a container: never callable, never a name
_STR = _Symbol("<str>")  # a string whose value was not kept
_ANY = _Symbol("<any>")  # the result of a call, a persistent load, ...: may be anything


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
    """Something loading the pickle would do: import a global or call something.

    ``offset`` is the first occurrence, ``count`` how many times the walk met it.
    """

    kind: str  # "global" (an import), "call" (REDUCE/NEWOBJ/OBJ/INST) or "unresolved"
    target: Global | None  # None when the target cannot be determined statically
    offset: int
    detail: str = ""
    count: int = 1


@dataclass(frozen=True)
class PersistentId:
    """A ``torch.save`` storage reference: ``('storage', type, key, location, numel)``.

    Legacy (pre-zip) files add a sixth item, view metadata, which is not kept.
    """

    storage_type: Global
    key: str
    location: str
    numel: int
    offset: int


@dataclass
class WalkResult:
    """Events of one pickle, the storages it references, whether it reached ``STOP``.

    ``error`` says why a walk that did not reach ``STOP`` ended (a real unpickler raises there),
    and ``error_offset`` where. ``opcodes`` counts the opcodes walked.
    """

    events: list[Event] = field(default_factory=list)
    storages: list[PersistentId] = field(default_factory=list)
    foreign_ids: int = 0  # persistent ids that are not torch storages
    complete: bool = False
    protocol: int = 0
    error: str = ""
    error_offset: int = -1
    opcodes: int = 0


@dataclass(frozen=True)
class WalkLimits:
    """Caps that keep a walk bounded in memory whatever the input.

    Attributes:
        symbols: entries on the symbolic stack plus memo entries at any time (8 bytes each,
            plus kept strings of at most 256 characters). A ``torch.save`` pickle needs about
            five per tensor.
        opcodes: opcodes walked for one file (every pickle of every member together); this
            bounds the time of a scan. A ``torch.save`` pickle has about 30 per tensor.
    """

    symbols: int = 8_000_000
    opcodes: int = 32_000_000


def normalise(module: str, name: str) -> Global:
    """Apply the Python 2 name mapping ``pickle`` applies (``__builtin__`` -> ``builtins``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return Global(module, name)


class _Stop(Exception):
    """A real unpickler raises here; the walk ends."""


class Source:
    """A chunked, bounded reader over a binary stream, shared by consecutive walks.

    ``buf[pos:end]`` holds unread bytes; ``buf`` carries 16 bytes of padding after ``end`` so
    that the walk can read a short fixed-size argument first and check ``end`` after.
    """

    def __init__(self, stream: IO[bytes], *, name: str = "", opcodes: int = 0) -> None:
        self.stream = stream
        self.name = name
        self.buf = _PAD
        self.pos = 0
        self.end = 0
        self.base = stream.tell() if stream.seekable() else 0  # stream offset of buf[0]
        self.opcodes = opcodes  # walked so far, counted against WalkLimits.opcodes

    @property
    def offset(self) -> int:
        """Stream offset of the next unread byte."""
        return self.base + self.pos

    def at_end(self) -> bool:
        """True when no byte is left."""
        return not self.fill(1)

    def fill(self, n: int) -> bool:
        """Make ``n`` bytes available from ``pos``; False at end of stream."""
        if self.pos + n <= self.end:
            return True
        parts = [self.buf[self.pos : self.end]]
        self.base += self.pos
        have = self.end - self.pos
        while have < n:
            chunk = self.stream.read(max(_CHUNK, n - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        parts.append(_PAD)
        self.buf, self.pos, self.end = b"".join(parts), 0, have
        return have >= n

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (``n`` is small); raises at end of stream."""
        if not self.fill(n):
            raise _Stop("the pickle is truncated")
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes without keeping them (long strings and bytes)."""
        available = self.end - self.pos
        if n <= available:
            self.pos += n
            return
        n -= available
        self.base += self.end
        self.buf, self.pos, self.end = _PAD, 0, 0
        while n > 0:
            chunk = self.stream.read(min(n, _CHUNK))
            if not chunk:
                raise _Stop("the pickle is truncated")
            n -= len(chunk)
            self.base += len(chunk)

    def line(self) -> bytes | None:
        """The next newline-terminated line without its newline; None when it is longer than
        4 KiB (then skipped, never held: the caller decides what such a line means)."""
        while True:
            stop = self.buf.find(b"\n", self.pos, min(self.end, self.pos + _LINE_LIMIT + 1))
            if stop >= 0:
                data = self.buf[self.pos : stop]
                self.pos = stop + 1
                return data
            if self.end - self.pos > _LINE_LIMIT:
                self.skip_line()
                return None
            if not self.fill(self.end - self.pos + 1):
                raise _Stop(_TRUNCATED)

    def skip_line(self) -> None:
        """Consume bytes up to and including the next newline, a chunk at a time."""
        while True:
            stop = self.buf.find(b"\n", self.pos, self.end)
            if stop >= 0:
                self.pos = stop + 1
                return
            self.pos = self.end
            if not self.fill(1):
                raise _Stop(_TRUNCATED)


def _text(data: bytes) -> str | _Symbol:
    """A kept string, or a placeholder when it is too long to ever be a name."""
    if len(data) > _KEPT_STRING * 4:
        return _STR
    try:
        text = data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise _Stop("a string that is not UTF-8") from None
    return text if len(text) <= _KEPT_STRING else _STR


def _ascii(data: bytes) -> str | _Symbol:
    """A protocol-0/1 byte string, decoded the way ``pickle`` decodes it by default (ASCII)."""
    try:
        return data.decode("ascii") if len(data) <= _KEPT_STRING else _STR
    except UnicodeDecodeError:
        return _STR  # pickle would fail or return bytes; never a name either way


def _quoted(line: bytes | None) -> str | _Symbol:
    """The value of a protocol-0 ``STRING`` argument (``'os'``)."""
    if line is None:
        return _STR
    if len(line) >= 2 and line[:1] == line[-1:] and line[:1] in (b"'", b'"'):
        try:
            with warnings.catch_warnings():  # "invalid escape sequence" of untrusted bytes
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = codecs.escape_decode(line[1:-1])[0]
            return _ascii(decoded)
        except ValueError:
            raise _Stop("an invalid protocol-0 string") from None
    raise _Stop("a protocol-0 string without quotes")


def _number(line: bytes | None) -> int | _Symbol:
    """A protocol-0 ``INT``/``LONG`` value; anything unusual is plain data, never a stop.

    Where the walk cannot be sure that every unpickler rejects an argument, it goes on: going
    on can only report more, stopping could miss what a real unpickler runs next.
    """
    if line is None:
        return _DATA
    try:
        return int(line.rstrip(b"L"), 0) if len(line) <= 40 else _DATA
    except ValueError:
        return _DATA


_FIXED_DATA = {  # opcode -> argument length, for opcodes that push one plain value
    ord("G"): 8,  # BINFLOAT
    ord("N"): 0,  # NONE
    0x88: 0,  # NEWTRUE
    0x89: 0,  # NEWFALSE
    ord("]"): 0,  # EMPTY_LIST
    ord("}"): 0,  # EMPTY_DICT
    ord(")"): 0,  # EMPTY_TUPLE
    0x8F: 0,  # EMPTY_SET
}
_RUN_START = frozenset(_FIXED_DATA) | frozenset(b"KMJ")
# A run of plain values right after a MARK that the next opcode pops as a whole (APPENDS,
# SETITEMS, ADDITEMS, LIST, DICT, FROZENSET, POP_MARK): skipped in one regex match, as it
# leaves nothing behind. TUPLE is not among them: tuple contents are kept (persistent ids).
_DATA_RUN = re.compile(rb"(?:G[\s\S]{8}|J[\s\S]{4}|M[\s\S]{2}|K[\s\S]|[N\x88\x89\]\})\x8f])++")
_POPS_TO_MARK = frozenset(b"eu\x90ld\x911")


class _Machine:
    """The symbolic stack, marks and memo of one pickle."""

    def __init__(self, source: Source, limits: WalkLimits, result: WalkResult) -> None:
        self.src = source
        self.limits = limits
        self.result = result
        self.stack: list[object] = []
        self.marks: list[int] = []
        self.memo: list[object] = []  # contiguous keys 0..n-1 (what pickle itself writes)
        self.sparse: dict[int, object] = {}  # any other keys
        self.seen: dict[tuple[str, str, str, str], int] = {}  # event key -> index
        self.counts: list[int] = []  # occurrences of each event, applied when the walk ends
        # Events met after an unregistered EXT code (None before one): a loader here raises at
        # that code, so they are reported only if the pickle reaches STOP (see ``extension``).
        self.pending: list[tuple[str, Global | None, int, str]] | None = None

    # --- events --------------------------------------------------------------------------

    def emit(self, kind: str, target: Global | None, offset: int, detail: str = "") -> None:
        if self.pending is not None:
            self.pending.append((kind, target, offset, detail))
            return
        key = (kind, target.module, target.name, detail) if target else (kind, "", "", detail)
        index = self.seen.get(key)
        if index is None:
            self.seen[key] = len(self.result.events)
            self.result.events.append(Event(kind, target, offset, detail))
            self.counts.append(1)
        else:
            self.counts[index] += 1

    def call(self, callee: object, offset: int, how: str) -> None:
        if isinstance(callee, Global):
            self.emit("call", callee, offset, how)
        elif callee is _ANY:
            self.emit("unresolved", None, offset, f"a {how} call of a value computed at load time")
        else:
            raise _Stop(f"{how} calls a plain value (a loader raises TypeError here)")
        self.stack.append(_ANY)

    # --- stack and memo ------------------------------------------------------------------

    def pop(self) -> object:
        stack = self.stack
        if len(stack) <= (self.marks[-1] if self.marks else 0):
            raise _Stop("stack underflow")
        return stack.pop()

    def pop_mark(self) -> list[object]:
        if not self.marks:
            raise _Stop("no MARK to pop to")
        fence = self.marks.pop()
        items = self.stack[fence:]
        del self.stack[fence:]
        return items

    def check_size(self, opcodes: int) -> None:
        """Raise when the walk outgrows its limits (checked every 65,536 opcodes)."""
        limits = self.limits
        if len(self.stack) + len(self.memo) + len(self.sparse) > limits.symbols:
            raise ResourceLimitError(
                f"{self.src.name}: the pickle holds more than {limits.symbols:,} values at "
                "once; torch.save pickles hold structure only (about ten values per tensor), so "
                "this is not one torchkeep reads. Convert it where it was made, to safetensors"
            )
        if opcodes > limits.opcodes:
            raise ResourceLimitError(
                f"{self.src.name}: more than {limits.opcodes:,} pickle opcodes in one file; "
                "torch.save pickles hold structure only (about 30 opcodes per tensor), so this "
                "is not one torchkeep reads. Convert it where it was made, to safetensors"
            )

    def top(self) -> object:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Stop("memoizing from an empty stack")
        return self.stack[-1]

    def put(self, key: int) -> None:
        value = self.top()
        memo = self.memo
        if 0 <= key < len(memo):
            memo[key] = value
        elif key == len(memo) and not self.sparse:
            memo.append(value)
        else:
            self.sparse[key] = value

    def get(self, key: int) -> object:
        if 0 <= key < len(self.memo):
            return self.memo[key]
        if key in self.sparse:
            return self.sparse[key]
        raise _Stop(f"memo entry {key} was never stored")

    # --- opcodes that need care ----------------------------------------------------------

    def stack_global(self, offset: int) -> None:
        name, module = self.pop(), self.pop()
        if isinstance(module, str) and isinstance(name, str):
            target = normalise(module, name)
            self.emit("global", target, offset)
            self.stack.append(target)
        elif all(isinstance(value, str) or value in (_STR, _ANY) for value in (module, name)):
            self.emit("unresolved", None, offset, "STACK_GLOBAL with a name built at load time")
            self.stack.append(_ANY)
        else:
            raise _Stop("STACK_GLOBAL of values that are not strings")

    def line_global(self, offset: int, inst: bool) -> None:
        module_line, attr_line = self.src.line(), self.src.line()
        if module_line is None or attr_line is None:
            # A long dotted name can still resolve (``path.os.path.os...system``).
            self.emit("unresolved", None, offset, f"a global name longer than {_LINE_LIMIT} bytes")
            raise _Stop("a global name too long to resolve")
        try:
            module, attr = module_line.decode("utf-8"), attr_line.decode("utf-8")
        except UnicodeDecodeError:
            raise _Stop("a global name that is not UTF-8 (a loader raises here)") from None
        target = normalise(module, attr)
        self.emit("global", target, offset)
        if inst:
            self.pop_mark()
            self.call(target, offset, "INST")
        else:
            self.stack.append(target)

    def extension(self, code: int, offset: int) -> None:
        """``EXT``: a global looked up in copyreg's registry of the loading process.

        A code registered here resolves to its global, reported as unresolved all the same (the
        loading process may map it elsewhere). An unregistered code makes a loader raise, unless
        the loading process registered it: it and every event after it are reported only if the
        pickle reaches ``STOP``, so that raw bytes (tensor data) which merely contain an EXT
        opcode followed by a call are not taken for a pickle.
        """
        entry = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
        detail = f"EXT {code} imports a global from copyreg's registry"
        if entry is None:
            if self.pending is None:
                self.pending = []
            self.emit("unresolved", None, offset, detail)
            self.stack.append(_ANY)
            return
        target = normalise(*entry)
        self.emit("global", target, offset)
        self.emit("unresolved", None, offset, detail)
        self.stack.append(target)

    def build(self, offset: int) -> None:
        self.pop()  # the state
        inst = self.pop()
        if isinstance(inst, Global):
            self.emit(
                "unresolved",
                None,
                offset,
                f"BUILD sets attributes on the imported {inst.full_name} itself",
            )
        self.stack.append(inst)

    def persistent(self, pid: object, offset: int) -> None:
        if (
            isinstance(pid, tuple)
            and len(pid) in (5, 6)  # legacy files add view metadata
            and pid[0] == "storage"
            and isinstance(pid[1], Global)
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)
            and isinstance(pid[4], int)
        ):
            self.result.storages.append(PersistentId(pid[1], pid[2], pid[3], pid[4], offset))
        else:
            self.result.foreign_ids += 1
        self.stack.append(_ANY)

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> None:  # one loop, state in locals: the walk's speed is this loop's
        """Walk to ``STOP`` or to where a real unpickler would raise (the common opcodes).

        The read position lives in locals (``pos``, ``buf``, ``end``, ``base``) and is written
        back to the source before any call that reads from it (``sync``) and reloaded after.
        """
        src = self.src
        stack = self.stack
        push = stack.append
        marks = self.marks
        memo = self.memo
        sparse = self.sparse
        fixed = _FIXED_DATA
        run_after_mark = _DATA_RUN.match
        run_start = _RUN_START
        pops_to_mark = _POPS_TO_MARK
        kept_string = _KEPT_STRING * 4
        count = 0
        pos, buf, end, base = src.pos, src.buf, src.end, src.base
        fence = marks[-1] if marks else 0  # the stack may not be popped below this
        offset = base + pos
        try:
            while True:
                if pos + 9 > end:
                    src.pos = pos
                    src.fill(9)  # near the end of the stream it holds fewer; reads check end
                    pos, buf, end, base = src.pos, src.buf, src.end, src.base
                    if pos >= end:
                        raise _Stop("the pickle ends before STOP")
                code = buf[pos]
                count += 1
                if not count & 0xFFFF:
                    self.check_size(src.opcodes + count)
                if code == 0x71 or code == 0x72:  # q BINPUT, r LONG_BINPUT
                    if len(stack) <= fence:
                        raise _Stop("memoizing from an empty stack")
                    if code == 0x71:
                        key = buf[pos + 1]
                        pos += 2
                    else:
                        key = int.from_bytes(buf[pos + 1 : pos + 5], "little")
                        pos += 5
                    if pos > end:
                        raise _Stop(_TRUNCATED)
                    if key < len(memo):
                        memo[key] = stack[-1]
                    elif key == len(memo) and not sparse:
                        memo.append(stack[-1])
                    else:
                        sparse[key] = stack[-1]
                elif code == 0x58 or code == 0x8C:  # X BINUNICODE, SHORT_BINUNICODE
                    if code == 0x58:
                        length = int.from_bytes(buf[pos + 1 : pos + 5], "little")
                        pos += 5
                    else:
                        length = buf[pos + 1]
                        pos += 2
                    if pos + length <= end and length <= kept_string:
                        push(_text(buf[pos : pos + length]))
                        pos += length
                    else:
                        if pos > end:
                            raise _Stop(_TRUNCATED)
                        src.pos = pos
                        if length > kept_string:
                            src.skip(length)
                            push(_STR)
                        else:
                            push(_text(src.take(length)))
                        pos, buf, end, base = src.pos, src.buf, src.end, src.base
                elif code == 0x68 or code == 0x6A:  # h BINGET, j LONG_BINGET
                    if code == 0x68:
                        key = buf[pos + 1]
                        pos += 2
                    else:
                        key = int.from_bytes(buf[pos + 1 : pos + 5], "little")
                        pos += 5
                    if pos > end:
                        raise _Stop(_TRUNCATED)
                    push(memo[key] if key < len(memo) else self.get(key))
                elif code == 0x28:  # ( MARK
                    fence = len(stack)
                    marks.append(fence)
                    pos += 1
                    if buf[pos] in run_start:  # a run of plain values popped back to this MARK?
                        match = run_after_mark(buf, pos, end)
                        if match and match.end() < end and buf[match.end()] in pops_to_mark:
                            count += (match.end() - pos) // 9
                            pos = match.end()
                elif code in fixed:
                    pos += 1 + fixed[code]
                    if pos > end:
                        raise _Stop(_TRUNCATED)
                    push(_DATA)
                elif code == 0x4B:  # K BININT1
                    push(buf[pos + 1])
                    pos += 2
                    if pos > end:
                        raise _Stop(_TRUNCATED)
                elif code == 0x74:  # t TUPLE
                    if not marks:
                        raise _Stop("no MARK to pop to")
                    items = stack[fence:]
                    del stack[fence:]
                    marks.pop()
                    fence = marks[-1] if marks else 0
                    push(tuple(items) if len(items) <= _KEPT_TUPLE else _DATA)
                    pos += 1
                elif code == 0x52:  # R REDUCE
                    if len(stack) - fence < 2:
                        raise _Stop("stack underflow")
                    stack.pop()
                    callee = stack.pop()
                    if isinstance(callee, Global):
                        self.emit("call", callee, base + pos, "REDUCE")
                        push(_ANY)
                    else:
                        offset = base + pos
                        self.call(callee, offset, "REDUCE")
                    pos += 1
                elif 0x85 <= code <= 0x87:  # TUPLE1, TUPLE2, TUPLE3
                    n = code - 0x84
                    if len(stack) - fence < n:
                        raise _Stop("stack underflow")
                    items = stack[-n:]
                    del stack[-n:]
                    push(tuple(items))
                    pos += 1
                elif code == 0x4D or code == 0x4A:  # M BININT2, J BININT
                    size = 3 if code == 0x4D else 5
                    if pos + size > end:
                        raise _Stop(_TRUNCATED)
                    push(int.from_bytes(buf[pos + 1 : pos + size], "little", signed=size == 5))
                    pos += size
                elif code == 0x75 or code == 0x65 or code == 0x90:  # SETITEMS APPENDS ADDITEMS
                    if not marks:
                        raise _Stop("no MARK to pop to")
                    del stack[fence:]
                    marks.pop()
                    fence = marks[-1] if marks else 0
                    if len(stack) <= fence:  # the container
                        raise _Stop("stack underflow")
                    pos += 1
                elif code == 0x61 or code == 0x73:  # APPEND SETITEM
                    n = 2 if code == 0x61 else 3  # the container stays
                    if len(stack) - fence < n:
                        raise _Stop("stack underflow")
                    del stack[1 - n :]
                    pos += 1
                elif code == 0x94:  # MEMOIZE
                    if len(stack) <= fence:
                        raise _Stop("memoizing from an empty stack")
                    if sparse:
                        self.put(len(memo) + len(sparse))
                    else:
                        memo.append(stack[-1])
                    pos += 1
                else:
                    offset = base + pos
                    src.pos = pos + 1
                    done = self.rare(code, offset)
                    pos, buf, end, base = src.pos, src.buf, src.end, src.base
                    fence = marks[-1] if marks else 0
                    if done:
                        return
        except _Stop as stop:
            self.result.error = str(stop)
            self.result.error_offset = base + pos
        finally:
            src.pos = pos
            src.opcodes += count
            self.result.opcodes = count
            self.result.events = [
                replace(event, count=n) if n > 1 else event
                for event, n in zip(self.result.events, self.counts, strict=True)
            ]

    def rare(self, code: int, offset: int) -> bool:
        """Every other opcode (``src.pos`` is just after the opcode byte); True at ``STOP``."""
        src = self.src
        push = self.stack.append
        pop = self.pop
        if code == 0x51:  # Q BINPERSID
            self.persistent(pop(), offset)
        elif code == 0x63:  # c GLOBAL
            self.line_global(offset, inst=False)
        elif code == 0x93:  # STACK_GLOBAL
            self.stack_global(offset)
        elif code == 0x2E:  # . STOP
            pop()
            self.result.complete = True
            pending, self.pending = self.pending or [], None
            for event in pending:
                self.emit(*event)
            return True
        elif code == 0x80:  # PROTO
            self.result.protocol = src.take(1)[0]
            if self.result.protocol > 5:
                raise _Stop(f"unsupported pickle protocol {self.result.protocol}")
        elif code == 0x95:  # FRAME (a length hint only)
            src.take(8)
        elif code == 0x62:  # b BUILD
            self.build(offset)
        elif code == 0x81:  # NEWOBJ
            pop()
            self.call(pop(), offset, "NEWOBJ")
        elif code == 0x92:  # NEWOBJ_EX
            pop()
            pop()
            self.call(pop(), offset, "NEWOBJ_EX")
        elif code == 0x6F:  # o OBJ
            items = self.pop_mark()
            if not items:
                raise _Stop("OBJ without a class")
            self.call(items[0], offset, "OBJ")
        elif code == 0x69:  # i INST
            self.line_global(offset, inst=True)
        elif code in (0x82, 0x83, 0x84):  # EXT1, EXT2, EXT4
            ext = int.from_bytes(src.take({0x82: 1, 0x83: 2, 0x84: 4}[code]), "little")
            self.extension(ext, offset)
        elif code == 0x50:  # P PERSID
            line = src.line()
            self.persistent(_STR if line is None else _ascii(line), offset)
        elif code == 0x30:  # 0 POP (pops a MARK when one is on top)
            if self.marks and self.marks[-1] == len(self.stack):
                self.marks.pop()
            else:
                pop()
        elif code == 0x31:  # 1 POP_MARK
            self.pop_mark()
        elif code == 0x32:  # 2 DUP
            push(self.top())
        elif code in (0x6C, 0x64, 0x91):  # LIST DICT FROZENSET
            self.pop_mark()
            push(_DATA)
        elif code == 0x8A:  # LONG1
            size = src.take(1)[0]
            push(int.from_bytes(src.take(size), "little", signed=True))
        elif code == 0x8B:  # LONG4
            (size,) = _I32(src.take(4))
            if size < 0:
                raise _Stop("LONG4 with a negative length")
            src.skip(size)
            push(_DATA)
        elif code in (0x42, 0x54):  # B BINBYTES, T BINSTRING
            (length,) = _U32(src.take(4)) if code == 0x42 else _I32(src.take(4))
            if length < 0:
                raise _Stop("BINSTRING with a negative length")
            if code == 0x42 or length > _KEPT_STRING:
                src.skip(length)
                push(_DATA if code == 0x42 else _STR)
            else:
                push(_ascii(src.take(length)))
        elif code in (0x43, 0x55):  # C SHORT_BINBYTES, U SHORT_BINSTRING
            data = src.take(src.take(1)[0])
            push(_DATA if code == 0x43 else _ascii(data))
        elif code in (0x8D, 0x8E, 0x96):  # BINUNICODE8, BINBYTES8, BYTEARRAY8
            (length,) = _U64(src.take(8))
            if code == 0x8D and length <= _KEPT_STRING * 4:
                push(_text(src.take(length)))
            else:
                src.skip(length)
                push(_STR if code == 0x8D else _DATA)
        elif code == 0x53:  # S STRING
            push(_quoted(src.line()))
        elif code == 0x56:  # V UNICODE
            line = src.line()
            try:
                text = _STR if line is None else line.decode("raw-unicode-escape")
            except UnicodeDecodeError:
                raise _Stop("an invalid protocol-0 unicode string") from None
            push(text if isinstance(text, _Symbol) or len(text) <= _KEPT_STRING else _STR)
        elif code in (0x49, 0x4C):  # I INT, L LONG
            push(_number(src.line()))
        elif code == 0x46:  # F FLOAT (an invalid one is plain data too, see _number)
            src.line()
            push(_DATA)
        elif code in (0x67, 0x70):  # g GET, p PUT
            line = src.line()
            if line is None:  # leading zeros or spaces may still make it a valid key
                self.emit("unresolved", None, offset, "a protocol-0 memo key over 4 KiB")
                raise _Stop("a protocol-0 memo key too long to read")
            try:  # unpicklers parse it as int() does, base 10: where int() fails, they fail
                key = int(line)
            except ValueError:
                raise _Stop("an invalid protocol-0 memo key") from None
            if code == 0x67:
                push(self.get(key))
            else:
                self.put(key)
        elif code == 0x97:  # NEXT_BUFFER (out-of-band data the caller supplies)
            push(_ANY)
        elif code == 0x98:  # READONLY_BUFFER
            push(pop())
        else:
            raise _Stop(f"invalid opcode 0x{code:02x}")
        return False


def walk_source(source: Source, limits: WalkLimits | None = None) -> WalkResult:
    """Walk the next pickle of ``source`` up to and including its ``STOP``.

    Parsing problems do not raise: they end the walk and are recorded in
    :attr:`WalkResult.error` with the events seen before them; only exceeding ``limits``
    raises (:class:`~torchkeep.errors.ResourceLimitError`).
    """
    result = WalkResult()
    machine = _Machine(source, limits or WalkLimits(), result)
    machine.run()
    machine.check_size(source.opcodes)  # the loop checks every 65,536 opcodes; this, the rest
    return result
