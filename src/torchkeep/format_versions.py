"""The format version of every kind of file torchkeep writes, and the check that refuses newer ones.

Each kind records its version where a reader finds it before anything else is used; a file
written before versions were recorded counts as version 1. A reader accepts every version in
its kind's table (older ones load unchanged) and raises
:class:`~torchkeep.errors.FormatVersionError` for any other, naming the file, the version and
the torchkeep release that reads it.

- weights: the safetensors metadata ``torchkeep.format_version``; writes 1; reads 1 (0.1.0).
- checkpoint: ``format_version`` in a step's ``manifest.json`` and ``state.json``; writes 1;
  reads 1 (0.1.0) and 2 (0.3.0).
- bundle: ``format_version`` in ``manifest.json`` and ``config.json``; writes 1; reads 1
  (0.1.0) and 2 (0.3.0).
- onnx report: ``format_version`` in the report stored in an ``.onnx`` file; writes 1; reads
  1 (0.1.0).
- sealed folder (a Hugging Face ``checkpoint-N`` sealed by the Trainer integration):
  ``format_version`` in its ``manifest.json``; writes 1; reads 1 (0.3.0).

Checkpoint version 2 is a sharded step (layout ``sharded-v1``), bundle version 2 one with a
``builder`` record; their writers pass ``format_version=2`` to
:func:`torchkeep.manifest.write_manifest` and record the same number in ``state.json`` /
``config.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ._version import __version__
from .errors import CorruptFileError, FormatVersionError


@dataclass(frozen=True)
class FormatKind:
    """One kind of file and the format versions this torchkeep reads.

    Attributes:
        name: the kind, as messages name it (``"checkpoint"``).
        where: where a file records its version.
        writes: the version written by default (a writer may pass a newer one it produces).
        introduced: every version read, with the torchkeep release that introduced it.
    """

    name: str
    where: str
    writes: int
    introduced: Mapping[int, str]

    @property
    def newest(self) -> int:
        """The newest version this torchkeep reads."""
        return max(self.introduced)


WEIGHTS = FormatKind(
    "weights", "the safetensors metadata 'torchkeep.format_version'", 1, {1: "0.1.0"}
)
CHECKPOINT = FormatKind(
    "checkpoint", "'format_version' in manifest.json and state.json", 1, {1: "0.1.0", 2: "0.3.0"}
)
BUNDLE = FormatKind(
    "bundle", "'format_version' in manifest.json and config.json", 1, {1: "0.1.0", 2: "0.3.0"}
)
ONNX_REPORT = FormatKind(
    "onnx report", "'format_version' in the stored export report", 1, {1: "0.1.0"}
)
SEALED = FormatKind(
    "sealed folder", "'format_version' in the seal's manifest.json", 1, {1: "0.3.0"}
)
KINDS = (WEIGHTS, CHECKPOINT, BUNDLE, ONNX_REPORT, SEALED)
"""Every kind, for the documentation table and the tests."""

WEIGHTS_KEY = "torchkeep.format_version"
"""The safetensors metadata key of a weights file's format version."""


def check_version(kind: FormatKind, version: int, *, source: object) -> int:
    """Return ``version`` if this torchkeep reads it for ``kind``, else raise.

    Args:
        kind: the kind of file.
        version: the version the file records (1 for files that record none).
        source: the file (or file and key) for the message.

    Raises:
        FormatVersionError: the version is not in the kind's table (a newer torchkeep wrote
            it); the message names the file, the version and the release needed.

    Example:
        >>> check_version(CHECKPOINT, 1, source="ckpt/step-00000001/manifest.json")
        1
    """
    if version in kind.introduced:
        return version
    raise FormatVersionError(
        f"{source} is {kind.name} format version {version}; this torchkeep ({__version__}) "
        f"reads versions {', '.join(map(str, sorted(kind.introduced)))}. It was written by a "
        f"newer torchkeep: upgrade to a torchkeep release newer than {__version__} that reads "
        f"{kind.name} format version {version}"
    )


def check_weights_metadata(metadata: Mapping[str, str], *, source: object) -> int:
    """The format version a safetensors file's metadata records (1 when it records none, as
    files of other tools and of torchkeep 0.1.0/0.2.0 do), checked with :func:`check_version`.

    Raises:
        CorruptFileError: the value is not a plain decimal number.
        FormatVersionError: a newer version.
    """
    raw = metadata.get(WEIGHTS_KEY)
    if raw is None:
        return 1
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise CorruptFileError(
            f"{source}: metadata {WEIGHTS_KEY!r} is {raw[:32]!r}, not a format version number; "
            "the file is damaged: save the weights again"
        )
    return check_version(WEIGHTS, int(raw), source=f"{source} (metadata {WEIGHTS_KEY!r})")
