"""The public surface is deliberate: this test changes whenever it does."""

from __future__ import annotations

import subprocess
import sys

import pytest

import torchkeep as tk

PUBLIC = {
    # verbs
    "save_weights", "load_weights", "load_state_dict",
    "save_model", "load_model", "register_alias", "register_builder", "scan", "load_pickled_model",
    "migrate_pickled_model", "export_onnx", "verify",
    # classes and reports
    "CheckpointManager", "Restored", "Keepable", "Stateful",
    "LoadReport", "ScanReport", "OnnxReport", "VerifyReport",
    # errors
    "TorchkeepError", "FileFormatError", "CorruptFileError", "FormatVersionError",
    "TorchkeepFileNotFoundError",
    "StateDictMismatchError", "ChecksumMismatchError", "StepExistsError", "DestinationExistsError",
    "CheckpointNotFoundError", "CheckpointBusyError", "UnsafeCheckpointError",
    "UnsafeBundleError", "StorageFullError", "InvalidDocumentError", "UnreadableFileError",
    "MissingDependencyError", "ModelClassNotFoundError", "InitArgsError", "UnsupportedValueError",
    "ExportError", "ExportVerificationError", "ResourceLimitError", "IntegrationError",
    "BuilderNameError",
    "DistributedCheckpointError",
    "CachePolicyError",
    "StorageCapabilityError", "RemoteStorageError", "Transfer",
    "__version__",
}  # fmt: skip


def test_exported_members_are_exactly_the_public_api() -> None:
    assert set(tk.__all__) == PUBLIC
    for name in tk.__all__:
        assert hasattr(tk, name), name


def test_every_public_callable_is_documented() -> None:
    for name in tk.__all__:
        member = getattr(tk, name)
        if callable(member):
            assert (member.__doc__ or "").strip(), f"{name} has no docstring"


# The builtin exception each error also is, so ``except ValueError`` etc. keep working.
BUILTIN_BASE = {
    "FileFormatError": ValueError,
    "CorruptFileError": ValueError,
    "FormatVersionError": ValueError,
    "TorchkeepFileNotFoundError": FileNotFoundError,
    "StateDictMismatchError": ValueError,
    "ChecksumMismatchError": ValueError,
    "StepExistsError": FileExistsError,
    "DestinationExistsError": FileExistsError,
    "CheckpointNotFoundError": FileNotFoundError,
    "UnsafeCheckpointError": ValueError,
    "StorageFullError": OSError,
    "MissingDependencyError": ImportError,
    "ModelClassNotFoundError": ImportError,
    "InitArgsError": TypeError,
    "IntegrationError": RuntimeError,
    "BuilderNameError": ValueError,
    "ExportError": RuntimeError,
    "ExportVerificationError": RuntimeError,
    "UnsupportedValueError": TypeError,
    "CheckpointBusyError": TimeoutError,
    "UnsafeBundleError": ValueError,
    "InvalidDocumentError": ValueError,
    "ResourceLimitError": ValueError,
    "DistributedCheckpointError": RuntimeError,
    "UnreadableFileError": (ValueError, OSError),  # damaged content and an I/O failure alike
    "CachePolicyError": ValueError,
    "StorageCapabilityError": ValueError,
    "RemoteStorageError": OSError,
}


@pytest.mark.parametrize(
    "name", [n for n in PUBLIC if n.endswith("Error") and n != "TorchkeepError"]
)
def test_every_error_is_a_torchkeep_error_and_its_builtin(name: str) -> None:
    error = getattr(tk, name)
    assert issubclass(error, tk.TorchkeepError)
    assert name in BUILTIN_BASE, f"{name} is new: add its builtin base to BUILTIN_BASE"
    base = BUILTIN_BASE[name]
    expected = base if isinstance(base, tuple) else (base,)
    for builtin in expected:
        assert issubclass(error, builtin), f"{name} is not a {builtin.__name__}"
    builtins = {b for b in error.__mro__ if b.__module__ == "builtins"}
    most_derived = [
        b for b in builtins if not any(o is not b and issubclass(o, b) for o in builtins)
    ]
    assert set(most_derived) == set(expected), f"{name}: builtin bases {most_derived}"
    assert not issubclass(error, (KeyboardInterrupt, SystemExit))


def test_import_does_not_load_optional_heavy_dependencies() -> None:
    code = (
        "import sys, torchkeep; "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
