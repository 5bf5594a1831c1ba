"""``scan``: find every pickle in a file (zip members, pickles in sequence, ``.pt2`` payloads)
and report what loading it would import and call, without executing anything."""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from ..errors import FileFormatError, TorchkeepFileNotFoundError
from ..formats import LEGACY_TORCH_PREFIX, Format, detect_format
from . import programs
from .policy import Severity, classify
from .walker import UNRESOLVED, Event, walk

# A legacy torch.save file is five pickles (magic, protocol, sys info, object, storage keys),
# then raw tensor bytes; torch unpickles exactly those five.
_LEGACY_PICKLES = 5
_MAX_ZIP_DEPTH = 3
_STORAGE_RECORD = re.compile(r"^(?P<prefix>[^/]+/)?data/\d+$")


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
    """

    path: Path
    format: Format
    findings: list[Finding] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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
        }


def _allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class _Collector:
    """Accumulates findings (deduplicated) into a report."""

    def __init__(self, report: ScanReport) -> None:
        self.report = report
        self._index: dict[tuple[str, str], int] = {}

    def add(
        self, name: str, kind: str, severity: Severity, where: str, reason: str, module: str = ""
    ) -> None:
        key = (name, kind)
        if key in self._index:
            i = self._index[key]
            self.report.findings[i] = replace(
                self.report.findings[i], count=self.report.findings[i].count + 1
            )
            return
        self._index[key] = len(self.report.findings)
        self.report.findings.append(Finding(name, kind, severity, where, reason, 1, module))

    def add_events(self, events: list[Event], member: str) -> None:
        for event in events:
            where = f"{member}@{event.offset}"
            if event.target is None:
                detail = event.detail or "a name that cannot be resolved statically"
                self.add(UNRESOLVED, event.kind, Severity.DANGEROUS, where, detail)
            else:
                severity, reason = classify(event.target)
                target = event.target
                self.add(target.full_name, event.kind, severity, where, reason, target.module)

    def walk_pickles(
        self, stream: IO[bytes], member: str, *, strict: int, top_level: bool = False
    ) -> None:
        """Walk pickles in sequence; the first ``strict`` must parse, later ones are optional.

        With ``top_level``, a stream whose first opcode is already invalid is not a pickle at
        all and raises :class:`FileFormatError` instead of being reported.
        """
        index = 0
        while True:
            start = stream.tell()
            if not stream.read(1):
                return
            stream.seek(start)
            result = walk(stream, precise=not top_level)
            if top_level and index == 0 and not result.complete and not result.events:
                raise FileFormatError(
                    f"{member} is neither a pickle, a torch.save file, a .pt2 archive nor a "
                    f"format torchkeep knows to be pickle-free ({result.error}); nothing to scan"
                )
            if index == 0 and not result.complete and not result.events and result.unpickler_fails:
                return  # no pickle: an unpickler raises before it imports or calls anything
            if index >= strict and not result.complete:
                stream.seek(0, os.SEEK_END)
                self.report.notes.append(
                    f"{member}: {stream.tell() - start} bytes after the last pickle (from "
                    f"offset {start}) are not a pickle and are never unpickled"
                )
                return
            self.report.pickles.append(f"{member}@{start} (protocol {result.protocol})")
            self.add_events(result.events, member)
            if not result.complete:
                self.add(
                    UNRESOLVED,
                    "unparseable",
                    Severity.DANGEROUS,
                    f"{member}@{start}",
                    f"a malformed pickle ({result.error}); a loader may still run what "
                    "precedes the damage",
                )
                return
            index += 1


def _torch_storage_records(names: list[str]) -> set[str]:
    """``<prefix>/data/<n>`` records of a torch zip: raw storage bytes, read but not unpickled."""
    pickles = {n.rsplit("/", 1)[0] + "/" for n in names if n.endswith("data.pkl")}
    return {
        n
        for n in names
        if (m := _STORAGE_RECORD.match(n)) and (m["prefix"] or "") in pickles | {""}
    }


def _scan_zip(collector: _Collector, archive: zipfile.ZipFile, label: str, depth: int) -> None:
    infos = archive.infolist()
    for hazard in programs.archive_hazards(infos, label):
        collector.add(hazard.name, "code", Severity.DANGEROUS, hazard.where, hazard.reason)
    skip = _torch_storage_records([info.filename for info in infos])
    for info in infos:
        member = f"{label}{info.filename}"
        if info.is_dir() or info.filename in skip:
            continue
        with archive.open(info) as f:
            head = f.read(16)
        if head.startswith(b"PK\x03\x04"):
            _scan_nested_zip(collector, archive.read(info), member, depth)
            continue
        with archive.open(info) as f:
            for hazard in programs.member_hazards(f, member):
                collector.add(hazard.name, "code", Severity.DANGEROUS, hazard.where, hazard.reason)
        # Every member is a potential pickle, whatever its name, first byte or any config says.
        strict = _LEGACY_PICKLES if head.startswith(LEGACY_TORCH_PREFIX) else 1
        with archive.open(info) as f:
            collector.walk_pickles(f, member, strict=strict)
        if "/code/" in f"/{info.filename}" and info.filename.endswith(".py"):
            collector.add(
                member,
                "code",
                Severity.DANGEROUS,
                member,
                "TorchScript code, run by torch.jit.load",
            )


def _scan_nested_zip(collector: _Collector, data: bytes, member: str, depth: int) -> None:
    if depth >= _MAX_ZIP_DEPTH:
        collector.add(member, "unresolved", Severity.DANGEROUS, member, "zips nested too deep")
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            _scan_zip(collector, inner, f"{member}!", depth + 1)
    except zipfile.BadZipFile as exc:
        collector.add(member, "unparseable", Severity.DANGEROUS, member, f"a damaged zip ({exc})")


def _scan_file(collector: _Collector, path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(0)
        if head.startswith(b"PK\x03\x04"):
            try:
                with zipfile.ZipFile(f) as archive:
                    _scan_zip(collector, archive, "", 0)
            except zipfile.BadZipFile as exc:
                raise FileFormatError(f"{path} starts like a zip but is damaged ({exc})") from None
            return
        strict = _LEGACY_PICKLES if head.startswith(LEGACY_TORCH_PREFIX) else 1
        collector.walk_pickles(f, str(path), strict=strict, top_level=True)


def scan(path: str | os.PathLike[str]) -> ScanReport:
    """Statically list what loading a file's pickles would import and call; never executes it.

    Handles ``torch.save`` zips (every member walked as a potential pickle, whatever its name,
    first byte or any config says, and zips inside zips), legacy torch files (pickles in
    sequence), raw pickles of any protocol, ``.pt2`` programs (every field torch turns into
    code must be proven plain data: see :mod:`torchkeep.security.programs`; duplicate entries
    and native code are dangerous) and TorchScript archives. The
    format is recognised by content, so a wrong suffix changes nothing. Safetensors, ONNX and
    torchkeep bundles without a program hold no pickles. Names that cannot be resolved
    statically are reported as dangerous.

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
    if not path.exists():
        raise TorchkeepFileNotFoundError(f"{path} does not exist; check the path")
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
    report.findings.sort(key=lambda f: (-list(Severity).index(f.severity), f.name))
    if not report.findings:
        report.notes.append("no globals, no calls: loadable with weights_only=True")
    return report
