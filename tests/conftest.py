"""Shared fixtures: small real models and helpers to compare state bit for bit."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import nn

from torchkeep.models import Net, small_vgg

# Remote-storage fixtures: moto S3 server, fault proxy, memory:// (tests/remote/fixtures.py).
pytest_plugins = ["tests.remote.fixtures"]

# CI replays the same examples on every run (a failure there is reproducible, never a flake);
# developers' runs explore new ones. Each fuzz test still sets its own example count.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


class TiedLM(nn.Module):
    """A tiny language model whose output layer shares the embedding's weight."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens)))


@pytest.fixture(autouse=True)
def _restore_deterministic_mode() -> Iterator[None]:
    """Lightning's ``Trainer(deterministic=True)`` turns torch's deterministic mode on for the
    whole process; later tests must not inherit it (under torch 2.4 it cannot even clone a
    float8 tensor)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(scope="session")
def transformers_models() -> None:
    """Skips unless transformers' torch models are usable (``pytestmark`` of the modules that
    build them: transformers 5 disables them under torch < 2.6)."""
    from tests._compat import require_transformers_with_torch

    require_transformers_with_torch()


def assert_state_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bytes (NaN payloads and -0.0 included)."""
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for key in a:
        x, y = a[key].detach().cpu(), b[key].detach().cpu()
        assert x.dtype == y.dtype, key
        assert x.shape == y.shape, key
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), key


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def vgg() -> nn.Module:
    torch.manual_seed(0)
    return small_vgg(batch_norm=True)


@pytest.fixture
def tied() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM()


@pytest.fixture(scope="session")
def net_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the tutorial's Net with a program (exported once per test session)."""
    import torchkeep as tk

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bundle") / "net.bundle"
    return tk.save_model(Net(), path, example_inputs=torch.randn(1, 3, 32, 32))
