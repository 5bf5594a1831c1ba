"""Bounded reads of untrusted zip members: size caps, an expansion ratio, a whole-file budget.

Every reader of an archive torchkeep did not write (the scanner, ``inspect`` of a ``.pt2``)
opens members through :class:`MemberReader`, so a zip bomb is refused from its directory
entries before anything is expanded, and the bytes actually read are streamed.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

from ..errors import CorruptFileError, ResourceLimitError
from .policy import LIMITS


class MemberReader:
    """Opens members of the archives inside one file against one expansion budget.

    Everything read from the file's members (zips inside zips included, through the same
    reader) may expand to at most ``max_ratio`` times the file's size (at least
    ``ratio_floor``): members that overlap each other (a non-recursive zip bomb) or nest (a
    recursive one) are refused even when each one looks modest.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.budget = max(LIMITS.ratio_floor, LIMITS.max_ratio * path.stat().st_size)

    def open(
        self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, cap: int
    ) -> IO[bytes]:
        """Open ``info`` of ``archive`` (shown as ``name``) for streaming, after checking it.

        Raises:
            CorruptFileError: the member is encrypted (torch never writes such members).
            ResourceLimitError: it expands more than ``max_ratio`` times, holds more than
                ``cap`` bytes, or would exhaust the file's budget.
        """
        if info.flag_bits & 0x1:
            raise CorruptFileError(
                f"{name} is encrypted; torch never writes encrypted members, so nothing in it "
                "can be checked"
            )
        expanded, packed = info.file_size, info.compress_size
        compressed = info.compress_type != zipfile.ZIP_STORED
        if compressed and expanded > LIMITS.ratio_floor and expanded > packed * LIMITS.max_ratio:
            raise ResourceLimitError(
                f"{name} expands from {packed:,} to {expanded:,} bytes (more than "
                f"{LIMITS.max_ratio}x): a zip bomb, or an archive torchkeep will not expand. "
                "Re-create it with torch.save, which stores its members uncompressed"
            )
        if expanded > cap:
            raise ResourceLimitError(
                f"{name} holds {expanded:,} bytes, more than the {cap:,} torchkeep reads from "
                "one member of an untrusted archive"
            )
        self.budget -= expanded
        if self.budget < 0:
            raise ResourceLimitError(
                f"{self.path}: its archive members expand to more than {LIMITS.max_ratio}x its "
                f"size (reached at {name}): overlapping or nested members (a zip bomb), or an "
                "archive torchkeep will not expand. Re-create it with torch.save, which stores "
                "its members uncompressed"
            )
        return archive.open(info)
