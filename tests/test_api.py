"""The public surface is deliberate: this test changes whenever it does."""

from __future__ import annotations

import subprocess
import sys

import pytest

import torchkeep as tk

PUBLIC = {
    # verbs
    "save_weights", "load_weights", "load_state_dict",
    "save_model", "load_model", "register_alias", "scan", "load_pickled_model",
    "migrate_pickled_model", "export_onnx", "verify",
    # classes and reports
    "CheckpointManager", "Restored", "Keepable", "Stateful",
    "LoadReport", "ScanReport", "OnnxReport", "VerifyReport",
    # errors
    "TorchkeepError", "FileFormatError", "CorruptFileError", "TorchkeepFileNotFoundError",
    "StateDictMismatchError", "ChecksumMismatchError", "StepExistsError", "DestinationExistsError",
    "CheckpointNotFoundError", "CheckpointBusyError", "UnsafeCheckpointError",
    "UnsafeBundleError", "StorageFullError",
    "MissingDependencyError", "ModelClassNotFoundError", "InitArgsError", "UnsupportedValueError",
    "ExportError", "ExportVerificationError", "ResourceLimitError",
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


@pytest.mark.parametrize(
    "name", [n for n in PUBLIC if n.endswith("Error") and n != "TorchkeepError"]
)
def test_every_error_is_a_torchkeep_error_and_a_builtin(name: str) -> None:
    error = getattr(tk, name)
    assert issubclass(error, tk.TorchkeepError)
    builtin_bases = [
        base for base in error.__mro__ if base.__module__ == "builtins" and base is not Exception
    ]
    assert builtin_bases, f"{name} inherits no builtin besides Exception"
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
