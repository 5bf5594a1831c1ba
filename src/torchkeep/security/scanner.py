"""``scan``: find every pickle in a file (zip members, pickles in sequence, ``.pt2`` payloads)
and report what loading it would import and call, without executing anything."""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import torch

from ..errors import (
    CorruptFileError,
    FileFormatError,
    ResourceLimitError,
)
from ..formats import LEGACY_TORCH_PREFIX, Format, detect_format
from ..paths import require_exists
from . import programs
from .members import MemberReader
from .policy import LIMITS, Severity, classify, resolve_loaded
from .walker import UNRESOLVED, Event, Global, PersistentId, Source, walk_source

# A legacy torch.save file is five pickles (magic, protocol, sys info, object, storage keys),
# then raw tensor bytes; torch unpickles exactly those five.
_LEGACY_PICKLES = 5
# torch.save names storages by decimal keys; only such records can be exempt from the walk.
_RECORD_KEY = re.compile(r"^[0-9]{1,19}$")


@dataclass(frozen=True)
class Finding:
    """One global imported or one call made by a pickle, with how dangerous it is.

    Attributes:
        name: dotted name (``"os.system"``), or ``"<unresolved>"`` when it cannot be known.
        kind: ``"global"``, ``"call"``, ``"unresolved"`` or ``"code"`` (non-pickle code).
        severity: see :class:`~torchkeep.security.Severity`.
        where: the pickle (zip member) and byte offset of the first occurrence.
        reason: why it has this severity.
        count: how many times it occurs.
        module: the module part of ``name`` (empty when unresolved or not a global).
    """

    name: str
    kind: str
    severity: Severity
    where: str
    reason: str
    count: int = 1
    module: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "severity": self.severity.value,
            "where": self.where,
            "reason": self.reason,
            "count": self.count,
        }


@dataclass
class ScanReport:
    """What :func:`scan` found in one file or directory.

    Attributes:
        path: the path scanned.
        format: its format, recognised by content.
        findings: every distinct global and call (most severe first).
        pickles: the pickles walked (``member@offset``).
        notes: other things worth knowing (trailing data, no pickles at all, ...).
        problems: damage that would make a load fail or return wrong data (a tensor record
            shorter or longer than its storage, a compressed or missing record).
    """

    path: Path
    format: Format
    findings: list[Finding] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def dangerous(self) -> list[Finding]:
        """Findings that would run code, touch files, processes or the network, or hide a name."""
        return [f for f in self.findings if f.severity == Severity.DANGEROUS]

    @property
    def globals(self) -> list[str]:
        """Every distinct global name imported, sorted."""
        return sorted({f.name for f in self.findings if f.kind == "global"})

    @property
    def is_safe(self) -> bool:
        """True when torch's weights-only unpickler alone could load every pickle found."""
        return all(f.severity == Severity.SAFE for f in self.findings)

    def offending(self, allow: Iterable[str] = ()) -> list[Finding]:
        """Findings that block loading with ``allow`` module prefixes (torch layers pass)."""
        prefixes = tuple(allow)
        return [
            f
            for f in self.findings
            if f.severity == Severity.DANGEROUS
            or (f.severity == Severity.USER and not _allowed(f.name, prefixes))
        ]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the report."""
        return {
            "path": str(self.path),
            "format": self.format.value,
            "safe": self.is_safe,
            "dangerous": len(self.dangerous),
            "findings": [f.to_json() for f in self.findings],
            "pickles": self.pickles,
            "notes": self.notes,
            "problems": self.problems,
        }


def _allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass
class _Walked:
    """What a walk over a stream of pickles found beyond findings."""

    storages: list[list[PersistentId]] = field(default_factory=list)
    end: int = 0  # stream offset just after the last complete pickle


class _Collector:
    """Accumulates findings (deduplicated) into a report."""

    def __init__(self, report: ScanReport) -> None:
        self.report = report
        self.limits = LIMITS
        self.opcodes = 0  # opcodes walked in the file so far, all pickles together
        self.not_pickles: list[str] = []  # members whose bytes stop an unpickler at once
        self._index: dict[tuple[str, str], int] = {}

    def summarise(self) -> None:
        """Add one note for every stream that turned out not to be a pickle."""
        if self.not_pickles:
            shown = ", ".join(self.not_pickles[:10])
            more = f" and {len(self.not_pickles) - 10} more" if len(self.not_pickles) > 10 else ""
            self.report.notes.append(
                f"not pickles, each stops an unpickler before it imports or calls anything "
                f"({len(self.not_pickles)}): {shown}{more}"
            )

    def add(
        self,
        name: str,
        kind: str,
        severity: Severity,
        where: str,
        reason: str,
        module: str = "",
        count: int = 1,
    ) -> None:
        key = (name, kind)
        if key in self._index:
            i = self._index[key]
            self.report.findings[i] = replace(
                self.report.findings[i], count=self.report.findings[i].count + count
            )
            return
        self._index[key] = len(self.report.findings)
        self.report.findings.append(Finding(name, kind, severity, where, reason, count, module))

    def add_events(self, events: list[Event], member: str) -> None:
        for event in events:
            where = f"{member}@{event.offset}"
            if event.target is None:
                detail = event.detail or "a name that cannot be resolved statically"
                self.add(
                    UNRESOLVED, event.kind, Severity.DANGEROUS, where, detail, count=event.count
                )
            else:
                severity, reason = classify(event.target)
                target = event.target
                self.add(
                    target.full_name,
                    event.kind,
                    severity,
                    where,
                    reason,
                    target.module,
                    event.count,
                )

    def walk_pickles(
        self, stream: IO[bytes], member: str, *, legacy: bool, top_level: bool = False
    ) -> _Walked:
        """Walk pickles in sequence: the first is what a loader unpickles, or for a ``legacy``
        torch file the first five, after which come tensor bytes that no loader unpickles.

        A walk that stops (where a real unpickler would raise) before importing or calling
        anything is harmless and only noted; one that stops after doing so is reported as
        dangerous. Past those first pickles, bytes that are not a complete pickle are never
        unpickled by anyone and are only noted. With ``top_level`` (a file, not a member), a
        stream whose first pickle stops before importing or calling anything raises: a
        :class:`FileFormatError` when its first byte is no opcode (not a pickle at all), else a
        :class:`CorruptFileError` (a damaged pickle no loader can read).

        Returns:
            The storages each complete pickle references, and where the last one ends.
        """
        source = Source(stream, name=member, opcodes=self.opcodes)
        try:
            return self._walk_source(source, member, legacy, top_level)
        finally:
            self.opcodes = source.opcodes

    def _walk_source(self, source: Source, member: str, legacy: bool, top_level: bool) -> _Walked:
        walked = _Walked()
        strict = _LEGACY_PICKLES if legacy else 1
        index = 0
        while not source.at_end():
            start = source.offset
            if legacy and index == _LEGACY_PICKLES:
                self.report.notes.append(
                    f"{member}: the bytes from offset {start} are tensor data, never unpickled"
                )
                return walked
            result = walk_source(source, self.limits.walk)
            if index >= strict and not result.complete:
                self.report.notes.append(
                    f"{member}: the bytes from offset {start} are not a complete pickle and "
                    "are never unpickled"
                )
                return walked
            if not result.complete and not result.events:
                if top_level and index == 0 and result.error_offset == start:
                    raise FileFormatError(
                        f"{member} is neither a pickle, a torch.save file, a .pt2 archive nor a "
                        f"format torchkeep knows to be pickle-free ({result.error}); nothing to "
                        "scan"
                    )
                if top_level and index == 0:
                    raise CorruptFileError(
                        f"{member} starts like a pickle but is damaged ({result.error} at "
                        f"offset {result.error_offset}): no unpickler can load it; re-create it "
                        "from its source"
                    )
                where = f"{member}@{start}" if start else member
                self.not_pickles.append(f"{where} ({result.error} at {result.error_offset})")
                return walked
            if len(self.report.pickles) >= LIMITS.max_pickles:
                raise ResourceLimitError(
                    f"{member}: more than {LIMITS.max_pickles:,} pickles in one file; a "
                    "torch.save file has one per archive (five in a legacy file)"
                )
            self.report.pickles.append(f"{member}@{start} (protocol {result.protocol})")
            self.add_events(result.events, member)
            if not result.complete:
                self.add(
                    UNRESOLVED,
                    "unparseable",
                    Severity.DANGEROUS,
                    f"{member}@{start}",
                    f"a malformed pickle ({result.error} at offset {result.error_offset}); a "
                    "loader still runs what precedes the damage",
                )
                return walked
            walked.storages.append(result.storages)
            walked.end = source.offset
            index += 1
        return walked


def _storage_nbytes(storage: PersistentId) -> int | None:
    """Bytes a storage holds, as torch computes them (None for a type torch would refuse)."""
    itemsize = _itemsize(storage.storage_type)
    return None if itemsize is None or storage.numel < 0 else storage.numel * itemsize


@functools.lru_cache(maxsize=64)
def _itemsize(storage_type: Global) -> int | None:
    cls = resolve_loaded(storage_type)
    if cls is torch.UntypedStorage:
        return 1
    with warnings.catch_warnings():  # legacy typed storages warn on every attribute access
        warnings.simplefilter("ignore")
        dtype = getattr(cls, "dtype", None) if isinstance(cls, type) else None
    return dtype.itemsize if isinstance(dtype, torch.dtype) else None


def _check_records(
    collector: _Collector,
    entries: dict[str, list[zipfile.ZipInfo]],
    storages: list[PersistentId],
    directory: str,
    label: str,
) -> set[str]:
    """Compare each storage a pickle declares with the record that holds it.

    ``entries`` maps each member name to its entries (a zip may repeat a name; readers
    disagree on which copy they read, so the scan reports that as dangerous, not here).
    ``directory`` is where the pickle's records live (``archive/data/``). Returns the names of
    the records that hold storages: raw tensor bytes that no loader unpickles.
    """
    records: set[str] = set()
    problems = collector.report.problems
    for storage in storages:
        if not _RECORD_KEY.match(storage.key):
            continue  # torch writes decimal keys; anything else exempts no member
        name = directory + storage.key
        records.add(name)
        shown = f"record {label}{name}"
        nbytes = _storage_nbytes(storage)
        found = entries.get(name, [])
        if not found:
            problems.append(f"{shown} is missing; the pickle declares storage {storage.key!r}")
        elif len(found) > 1:
            continue  # which copy a reader takes varies: a dangerous finding (archive_hazards)
        elif found[0].compress_type != zipfile.ZIP_STORED:
            problems.append(
                f"{shown} is compressed; torch.save stores tensor data as is and a "
                "memory-mapped read would return the compressed bytes"
            )
        elif nbytes is None:
            problems.append(
                f"{shown}: the pickle declares storage {storage.key!r} as "
                f"{storage.numel} x {storage.storage_type.full_name}, which torch cannot hold"
            )
        elif found[0].file_size != nbytes:
            problems.append(
                f"{shown} holds {found[0].file_size} bytes but the pickle declares "
                f"{nbytes} bytes ({storage.numel} x {storage.storage_type.name}) for storage "
                f"{storage.key!r}"
            )
    return records


class _Archive:
    """One archive being scanned (the file itself, or a zip inside it)."""

    def __init__(
        self,
        collector: _Collector,
        reader: MemberReader,
        archive: zipfile.ZipFile,
        label: str,
        depth: int,
    ) -> None:
        self.collector = collector
        self.reader = reader
        self.archive = archive
        self.label = label
        self.depth = depth

    def open(self, info: zipfile.ZipInfo, cap: int) -> IO[bytes]:
        """Open a member for streaming after checking its size and expansion."""
        return self.reader.open(self.archive, info, f"{self.label}{info.filename}", cap)

    def scan(self) -> None:
        """Scan the directory (duplicate names, native code), then every member: pickles, nested
        zips, program JSON, code.

        Every member is walked as a potential pickle whatever its name or first byte; the only
        exemption is a record that the archive's own ``data.pkl`` (walked first: the one pickle
        ``torch.save`` writes) references as a storage under its own directory, ``data/``:
        ``torch.load`` reads those as raw bytes, never unpickles them. Other pickles exempt
        nothing: a ``.pt2`` loader unpickles ``data/weights/<name>`` when its config says so,
        so a decoy ``data/weights.pkl`` claiming such a record must not hide it.
        """
        collector, label = self.collector, self.label
        for hazard in programs.archive_hazards(self.archive.infolist(), label):
            collector.add(hazard.name, "code", Severity.DANGEROUS, hazard.where, hazard.reason)
        infos = [info for info in self.archive.infolist() if not info.is_dir()]
        pickles = [info for info in infos if info.filename.rsplit("/", 1)[-1] == "data.pkl"]
        entries: dict[str, list[zipfile.ZipInfo]] = {}
        for info in infos:
            entries.setdefault(info.filename, []).append(info)
        raw: set[str] = set()
        for info in pickles:
            with self.open(info, LIMITS.max_member) as f:
                walked = collector.walk_pickles(f, f"{label}{info.filename}", legacy=False)
            if walked.storages:
                directory = info.filename[: -len(".pkl")] + "/"
                raw |= _check_records(collector, entries, walked.storages[0], directory, label)
        for info in infos:
            if info in pickles or info.filename in raw:
                continue
            self.scan_member(info)

    def scan_member(self, info: zipfile.ZipInfo) -> None:
        """Walk one member as pickles (or as a zip); check it as a program if it holds a JSON
        object (decided by content, never by name); plus what its name says torch does."""
        member = f"{self.label}{info.filename}"
        collector = self.collector
        with self.open(info, LIMITS.max_member) as f:
            head = f.read(16)
            f.seek(0)
            if head.startswith(b"PK\x03\x04"):
                self.scan_nested(info, f)
                return
            collector.walk_pickles(f, member, legacy=head.startswith(LEGACY_TORCH_PREFIX))
            f.seek(0)
            for hazard in programs.member_hazards(f, member, LIMITS.max_document):
                collector.add(hazard.name, "code", Severity.DANGEROUS, hazard.where, hazard.reason)
        if "/code/" in f"/{info.filename}" and info.filename.endswith(".py"):
            collector.add(
                member,
                "code",
                Severity.DANGEROUS,
                member,
                "TorchScript code, run by torch.jit.load",
            )

    def scan_nested(self, info: zipfile.ZipInfo, stream: IO[bytes]) -> None:
        """Scan a zip inside this one, copied to a temporary file past a few MiB."""
        member = f"{self.label}{info.filename}"
        if self.depth >= LIMITS.max_depth:
            self.collector.add(
                member, "unresolved", Severity.DANGEROUS, member, "zips nested too deep"
            )
            return
        with tempfile.SpooledTemporaryFile(max_size=LIMITS.spool) as copy:
            shutil.copyfileobj(stream, copy, 1 << 20)
            copy.seek(0)
            try:
                with zipfile.ZipFile(copy) as inner:
                    _Archive(
                        self.collector, self.reader, inner, f"{member}!", self.depth + 1
                    ).scan()
            except (
                zipfile.BadZipFile,
                EOFError,
                ValueError,
                NotImplementedError,
                zlib.error,
            ) as exc:
                if isinstance(exc, ResourceLimitError):
                    raise
                self.collector.add(
                    member, "unparseable", Severity.DANGEROUS, member, f"a damaged zip ({exc})"
                )


def _check_legacy(collector: _Collector, path: Path, walked: _Walked) -> None:
    """A legacy torch file's storages follow its five pickles: each an 8-byte count, then data."""
    if len(walked.storages) < _LEGACY_PICKLES:
        return
    sizes = [_storage_nbytes(s) for s in {s.key: s for s in walked.storages[3]}.values()]
    declared = sum(8 + size for size in sizes if size is not None)
    available = path.stat().st_size - walked.end
    if declared > available:
        collector.report.problems.append(
            f"{path} declares {declared} bytes of tensor data after its pickles but holds "
            f"{available}"
        )


def _scan_file(collector: _Collector, path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(0)
        if head.startswith(b"PK\x03\x04"):
            try:
                with zipfile.ZipFile(f) as archive:
                    _Archive(collector, MemberReader(path), archive, "", 0).scan()
            except (
                zipfile.BadZipFile,
                EOFError,
                NotImplementedError,
                UnicodeDecodeError,  # a member name that is not UTF-8 though its flag says so
                zlib.error,
            ) as exc:
                raise CorruptFileError(
                    f"{path} starts like a zip but is damaged ({exc}); re-create it from its source"
                ) from None
            return
        legacy = head.startswith(LEGACY_TORCH_PREFIX)
        walked = collector.walk_pickles(f, str(path), legacy=legacy, top_level=True)
    if legacy:
        _check_legacy(collector, path, walked)


def scan(path: str | os.PathLike[str]) -> ScanReport:
    """Statically list what loading a file's pickles would import and call; never executes it.

    Handles ``torch.save`` zips (zips inside zips too), legacy torch files (pickles in
    sequence), raw pickles of any protocol, ``.pt2`` programs (every field torch turns into
    code must be proven plain data: see :mod:`torchkeep.security.programs`; duplicate entries
    and native code are dangerous) and TorchScript archives. The format is recognised by
    content, so a wrong suffix changes nothing. Safetensors, ONNX and torchkeep bundles without
    a program hold no pickles. Names that cannot be resolved statically are reported as
    dangerous.

    Every archive member is walked as a potential pickle whatever its name, first byte or any
    config says, except the tensor records the archive's ``data.pkl`` references as storages;
    those are checked against the declared storage sizes instead (``report.problems``). Reading is
    bounded: members are streamed, and a file that would expand or walk past
    :data:`~torchkeep.security.policy.LIMITS` raises :class:`~torchkeep.errors.ResourceLimitError`.

    Args:
        path: a file, or a torchkeep bundle directory (its ``program.pt2`` is scanned).

    Returns:
        A :class:`ScanReport`; ``report.dangerous`` lists what must never be loaded.

    Example:
        >>> report = tk.scan("old_model.pth")
        >>> [f.name for f in report.dangerous]
        ['os.system']
    """
    path = Path(path)
    require_exists(path)
    fmt = detect_format(path)
    report = ScanReport(path, fmt)
    collector = _Collector(report)
    if path.is_dir():
        program = path / "program.pt2"
        if fmt != Format.BUNDLE and fmt not in (Format.CHECKPOINT_STEP, Format.CHECKPOINT_DIR):
            raise FileFormatError(f"{path} is a directory but not a torchkeep bundle or checkpoint")
        if program.is_file():
            _scan_file(collector, program)
        report.notes.append("safetensors and JSON files hold no code")
    elif fmt in (Format.SAFETENSORS, Format.ONNX):
        report.notes.append(f"{fmt.value} files hold no pickles")
    else:
        _scan_file(collector, path)
    collector.summarise()
    report.findings.sort(key=lambda f: (-list(Severity).index(f.severity), f.name))
    if not report.findings:
        report.notes.append("no globals, no calls: loadable with weights_only=True")
    return report
