"""The exceptions torchkeep raises.

Every error derives from :class:`TorchkeepError`, and each subclass also inherits the builtin
exception a caller would naturally catch (``FileNotFoundError``, ``ValueError``, ...), so both
``except tk.TorchkeepError`` and ``except ValueError`` work. Messages name the file, the key and
the fix.
"""

from __future__ import annotations

import re


class TorchkeepError(Exception):
    """Root of every error raised by torchkeep."""


class FileFormatError(TorchkeepError, ValueError):
    """A file is not in a format torchkeep can read (or not the format its caller expects)."""


class CorruptFileError(FileFormatError):
    """A file claims a known format but its contents are damaged or hostile."""


class InvalidDocumentError(CorruptFileError):
    """A JSON document torchkeep reads (a manifest, ``state.json``, a config) breaks its schema:
    a wrong type, a value out of range, nesting too deep, a document too large."""


class FormatVersionError(CorruptFileError):
    """A file was written in a format version newer than this torchkeep reads; the message names
    the file, the version found and the torchkeep release needed. Readers that skip damaged
    checkpoint steps skip such a step the same way (and say why)."""


class UnreadableFileError(CorruptFileError, OSError):
    """A file torchkeep must read cannot be read (permission denied, an I/O error); readers
    treat it like a damaged file (a checkpoint step is skipped and the previous one used)."""


class ResourceLimitError(CorruptFileError):
    """Reading a file would take more memory or time than its size justifies (a zip bomb, a
    pickle far larger than any ``torch.save`` structure); nothing was expanded or loaded."""


class TorchkeepFileNotFoundError(TorchkeepError, FileNotFoundError):
    """A path torchkeep was asked to read does not exist."""


class StateDictMismatchError(TorchkeepError, ValueError):
    """The keys or shapes of a stored state dict do not match the model it is loaded into."""


class ChecksumMismatchError(CorruptFileError):
    """A file's content hash differs from the one recorded in its manifest."""


class StepExistsError(TorchkeepError, FileExistsError):
    """A checkpoint step that already exists would be overwritten without ``overwrite=True``."""


class DestinationExistsError(TorchkeepError, FileExistsError):
    """A file would be overwritten without ``force=True`` (``--force`` on the command line)."""


class CheckpointNotFoundError(TorchkeepError, FileNotFoundError):
    """No committed, valid checkpoint step matches the request."""


class CheckpointBusyError(TorchkeepError, TimeoutError):
    """Every committed step was retired by a concurrent writer while it was being read, round
    after round; valid steps exist, but none could be read before it disappeared."""


class UnsafeCheckpointError(TorchkeepError, ValueError):
    """Loading a file would require executing code that was not explicitly allowed."""


class UnsafeBundleError(UnsafeCheckpointError):
    """A model bundle would make torchkeep import code located inside it, or holds files its
    manifest does not list."""


class StorageFullError(TorchkeepError, OSError):
    """The disk filled up while writing; nothing that was committed before was touched."""


class MissingDependencyError(TorchkeepError, ImportError):
    """An optional dependency is needed for this feature; the message gives the install command."""


class IntegrationError(TorchkeepError, RuntimeError):
    """A framework integration cannot run in this setup: a framework version outside the
    tested range (for an integration that overrides private methods), a strategy it does not
    cover (DeepSpeed, FSDP), or a checkpoint it did not write."""


class ModelClassNotFoundError(TorchkeepError, ImportError):
    """The class recorded in a model bundle cannot be imported."""


class InitArgsError(TorchkeepError, TypeError):
    """A model's constructor arguments cannot be captured or stored."""


class BuilderNameError(TorchkeepError, ValueError):
    """``tk.register_builder`` was given a name a bundle cannot hold, or a built-in one."""


class ExportError(TorchkeepError, RuntimeError):
    """Exporting a model (ONNX, torch.export) failed."""


class ExportVerificationError(ExportError):
    """An exported model gives outputs that differ from eager PyTorch beyond tolerance."""


class UnsupportedValueError(TorchkeepError, TypeError):
    """A value in training state cannot be stored without pickle; the message names its path."""


class DistributedCheckpointError(TorchkeepError, RuntimeError):
    """A collective checkpoint save or restore failed on one or more ranks; raised on every
    rank. ``failures`` maps each rank that reported a cause to its exception (a rank that died
    reports none: its peers see a lost connection or the group's timeout)."""

    def __init__(self, message: str, failures: dict[int, BaseException] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, BaseException] = dict(failures or {})


class CachePolicyError(TorchkeepError, ValueError):
    """A ``cache=`` argument names no cache policy (``"keep"``, ``"drop"`` or ``"auto"``)."""


class StorageCapabilityError(TorchkeepError, ValueError):
    """A storage back end cannot keep a promise torchkeep needs (an exclusive create, a
    conditional replace); the message names the URL, the missing capability and the way out."""


class RemoteStorageError(TorchkeepError, OSError):
    """An object-store operation failed for good: refused (403), still failing after its
    retries, or past the save's deadline. ``url``, ``operation``, ``attempts`` and ``status``
    (the last HTTP status or error name, None when unknown) say which and how."""

    def __init__(
        self,
        message: str,
        *,
        url: str = "",
        operation: str = "",
        attempts: int = 0,
        status: str | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.operation = operation
        self.attempts = attempts
        self.status = status


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for summaries.

    Terminal escape sequences (torch puts bold markers in some messages) are removed.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def missing_dependency(package: str, extra: str, feature: str) -> MissingDependencyError:
    """Build the error raised when an optional ``package`` needed by ``feature`` is absent."""
    return MissingDependencyError(
        f"{feature} needs the optional package {package!r}, which is not installed. "
        f"Install it with: pip install 'torchkeep[{extra}]' (from a checkout of torchkeep: "
        f"pip install -e '.[{extra}]')"
    )
