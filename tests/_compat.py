"""Test helpers for what differs between the torch versions of the tested range.

The library's own differences live in :mod:`torchkeep.compat`; the tests ask it (never
``torch.__version__`` directly), and a test that cannot run under the installed torch is
skipped here, with the reason, never silently.
"""

from __future__ import annotations

import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from torchkeep import compat


def skip_unless_programs_load() -> None:
    """Skip a test that loads a program with ``trust_program=True`` under a torch whose
    ``torch.export.load`` the program scan was not checked against (it refuses there)."""
    if not compat.program_loader_examined():
        pytest.skip(
            f"torch {torch.__version__}: trust_program loading is refused, the program scan was "
            "checked against torch.export.load of torch "
            + ", ".join(f"{a}.{b}" for a, b in sorted(compat.PROGRAM_LOADERS_EXAMINED))
        )


def custom_op(name: str) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.custom_op(name, mutates_args=())`` for a function defined in a module
    with postponed annotations: torch 2.4 reads ``__annotations__`` as written (strings) and
    refuses them, so they are resolved first (harmless on later versions)."""

    def register(fn: Callable[..., Any]) -> Any:
        fn.__annotations__ = typing.get_type_hints(fn)
        return torch.library.custom_op(name, mutates_args=())(fn)

    return register


def require_modules(*names: str) -> None:
    """Skip unless every named module imports: torchvision and timm are installed only in the
    newest-torch venv of ``make test-compat`` (and where the developer installed them)."""
    for name in names:
        pytest.importorskip(
            name, reason=f"{name} is not installed (the torch 2.15 venv of make test-compat has it)"
        )


needs_sharded_checkpoints = pytest.mark.skipif(
    not compat.sharded_checkpoints_available(),
    reason=f"torch {torch.__version__}: sharded checkpoints need torch >= "
    + ".".join(map(str, compat.SHARDED_CHECKPOINTS_FROM))
    + " (tests/test_compat.py checks the refusal under every torch)",
)
"""Marks the tests that write or restore sharded steps (``pytestmark`` of their modules)."""


def require_transformers_with_torch() -> Any:
    """The ``transformers`` module; skips unless it imports and sees torch: transformers 5
    needs torch >= 2.6 and under an older torch imports without its models."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    if not transformers.utils.is_torch_available():
        pytest.skip(
            f"transformers {transformers.__version__} disables its torch models under torch "
            f"{torch.__version__} (it needs torch >= 2.6)"
        )
    return transformers


def save_torchscript(module: torch.nn.Module, path: Path) -> None:
    """``torch.jit.save(torch.jit.script(module), path)``: TorchScript is deprecated in newer
    torch (a DeprecationWarning, an error in this suite), but the tests still need archives of
    it to show that torchkeep refuses them, so exactly that warning is expected here."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):  # FutureWarning from torch 2.15
            warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", category)
        torch.jit.save(torch.jit.script(module), str(path))


def plain_load_checks_record_sizes() -> bool:
    """Whether ``torch.load(weights_only=True)`` without mmap refuses a tensor record whose size
    disagrees with its storage (torch 2.5 and newer; 2.4 loads it, or fails elsewhere)."""
    return compat.torch_version() >= (2, 5)


def skip_unless_dynamo_onnx() -> None:
    """Skip a test of the dynamo ONNX exporter's own behaviour (its opsets, its report, a model
    only it mistranslates) under torch 2.4, where torchkeep exports with TorchScript."""
    if not compat.onnx_dynamo_export_available():
        pytest.skip(
            f"torch {torch.__version__} has no dynamo ONNX exporter (torch 2.5+): torchkeep "
            "uses the TorchScript exporter there, which the golden sets cover"
        )
