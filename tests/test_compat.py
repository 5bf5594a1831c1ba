"""torchkeep.compat: the torch-version differences, decided in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep import compat

GOLDEN = Path(__file__).parent / "golden"


def test_versions_parse() -> None:
    assert compat.torch_version("2.4.1+cu121") == (2, 4)
    assert compat.torch_version("2.15.0") == (2, 15)
    assert compat.torch_version() >= compat.OLDEST_SUPPORTED
    with pytest.raises(ValueError, match="cannot parse"):
        compat.torch_version("nightly")


def test_programs_load_only_under_an_examined_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean program is refused, by torchkeep's gate, under a torch whose loader nobody
    examined; the bundle's class still loads."""
    program = GOLDEN / "format-v1-torch-2.13.0" / "program.bundle" / "program.pt2"
    assert tk.scan(program).is_safe
    monkeypatch.setattr(compat, "PROGRAM_LOADERS_EXAMINED", frozenset({(1, 0)}))
    called: list[object] = []
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: called.append(a))
    with pytest.raises(tk.UnsafeCheckpointError, match=r"needs a torch whose torch\.export\.load"):
        tk.load_model(program, trust_program=True)
    assert called == []
    assert tk.load_model(program.parent) is not None
