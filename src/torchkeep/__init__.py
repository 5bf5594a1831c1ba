"""torchkeep: save, load, export and checkpoint PyTorch models safely, atomically and fast."""

from ._version import __version__
from .checkpoint import CheckpointManager, Restored
from .errors import (
    CheckpointBusyError,
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
    ResourceLimitError,
    StateDictMismatchError,
    StepExistsError,
    StorageFullError,
    TorchkeepError,
    TorchkeepFileNotFoundError,
    UnsafeBundleError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from .model import Keepable, load_model, migrate_pickled_model, register_alias, save_model
from .onnx import OnnxReport, export_onnx
from .security import ScanReport, load_pickled_model, scan
from .verify import VerifyReport, verify
from .weights import LoadReport, Stateful, load_state_dict, load_weights, save_weights

__all__ = [
    "CheckpointBusyError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CorruptFileError",
    "DestinationExistsError",
    "ExportError",
    "ExportVerificationError",
    "FileFormatError",
    "InitArgsError",
    "Keepable",
    "LoadReport",
    "MissingDependencyError",
    "ModelClassNotFoundError",
    "OnnxReport",
    "ResourceLimitError",
    "Restored",
    "ScanReport",
    "StateDictMismatchError",
    "Stateful",
    "StepExistsError",
    "StorageFullError",
    "TorchkeepError",
    "TorchkeepFileNotFoundError",
    "UnsafeBundleError",
    "UnsafeCheckpointError",
    "UnsupportedValueError",
    "VerifyReport",
    "__version__",
    "export_onnx",
    "load_model",
    "load_pickled_model",
    "load_state_dict",
    "load_weights",
    "migrate_pickled_model",
    "register_alias",
    "save_model",
    "save_weights",
    "scan",
    "verify",
]
