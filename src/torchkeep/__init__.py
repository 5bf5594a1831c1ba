"""torchkeep: save, load, export and checkpoint PyTorch models safely, atomically and fast."""

from ._version import __version__
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
)
from .onnx import OnnxReport, export_onnx
from .weights import LoadReport, Stateful, load_state_dict, load_weights, save_weights

__all__ = [
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
    "OnnxReport",
    "StateDictMismatchError",
    "Stateful",
    "StepExistsError",
    "StorageFullError",
    "TorchkeepError",
    "TorchkeepFileNotFoundError",
    "UnsafeCheckpointError",
    "__version__",
    "export_onnx",
    "load_state_dict",
    "load_weights",
    "save_weights",
]
