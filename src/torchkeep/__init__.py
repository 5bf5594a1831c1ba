"""torchkeep: save, load, export and checkpoint PyTorch models safely, atomically and fast."""

from ._version import __version__
from .errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptFileError,
    DestinationExistsError,
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
)
from .weights import LoadReport, Stateful, load_state_dict, load_weights, save_weights

__all__ = [
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CorruptFileError",
    "DestinationExistsError",
    "ExportError",
    "ExportVerificationError",
    "FileFormatError",
    "InitArgsError",
    "LoadReport",
    "MissingDependencyError",
    "ModelClassNotFoundError",
    "StateDictMismatchError",
    "Stateful",
    "StepExistsError",
    "StorageFullError",
    "TorchkeepError",
    "TorchkeepFileNotFoundError",
    "UnsafeCheckpointError",
    "__version__",
    "load_state_dict",
    "load_weights",
    "save_weights",
]
