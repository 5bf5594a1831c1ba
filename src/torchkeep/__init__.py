"""torchkeep: save, load, export and checkpoint PyTorch models safely, atomically and fast."""

from ._version import __version__
from .checkpoint import CheckpointManager, Restored
from .errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptFileError,
    ExportError,
    ExportVerificationError,
    FileFormatError,
    InitArgsError,
    MissingDependencyError,
    ModelClassNotFoundError,
    StateDictMismatchError,
    StepExistsError,
    StorageFullError,
    TorchkeepError,
    TorchkeepFileNotFoundError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from .verify import VerifyReport, verify
from .weights import LoadReport, Stateful, load_state_dict, load_weights, save_weights

__all__ = [
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CorruptFileError",
    "ExportError",
    "ExportVerificationError",
    "FileFormatError",
    "InitArgsError",
    "LoadReport",
    "MissingDependencyError",
    "ModelClassNotFoundError",
    "Restored",
    "StateDictMismatchError",
    "Stateful",
    "StepExistsError",
    "StorageFullError",
    "TorchkeepError",
    "TorchkeepFileNotFoundError",
    "UnsafeCheckpointError",
    "UnsupportedValueError",
    "VerifyReport",
    "__version__",
    "load_state_dict",
    "load_weights",
    "save_weights",
    "verify",
]
