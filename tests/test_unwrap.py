"""Compiled, DataParallel and DDP models through every job: clean keys stored, prefixes fixed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests import _dist_harness as harness
from torchkeep.models import Net
from torchkeep.unwrap import matching_view, strip_prefixes, unwrap

from .conftest import assert_state_equal


def _tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.BatchNorm1d(2))


@pytest.fixture(scope="module")
def ddp_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A gloo process group of world size 1, rendezvous through a file."""
    with harness.one_rank_group(tmp_path_factory.mktemp("ddp")):
        yield


def _wrap(kind: str, module: nn.Module) -> nn.Module:
    if kind == "compile":
        return torch.compile(module, backend="eager")  # type: ignore[return-value]
    if kind == "dp":
        return nn.DataParallel(module)
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(module)
    if kind == "compile+ddp":
        return torch.compile(nn.parallel.DistributedDataParallel(module), backend="eager")  # type: ignore[return-value]
    return module


KINDS = ["compile", "dp", "ddp", "compile+ddp"]


@pytest.fixture
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    if "ddp" in value:
        request.getfixturevalue("ddp_group")
    return value


def test_wrapped_state_dicts_really_carry_prefixes(ddp_group: None) -> None:
    """The premise: each wrapper prefixes every key, and unwrap finds the module inside."""
    net = _tiny(0)
    for wrapper, prefix in [("compile", "_orig_mod."), ("dp", "module."), ("ddp", "module.")]:
        wrapped = _wrap(wrapper, net)
        assert all(k.startswith(prefix) for k in wrapped.state_dict())
        assert unwrap(wrapped) is net
    assert unwrap(_wrap("compile+ddp", net)) is net
    assert strip_prefixes("_orig_mod.module.0.weight") == "0.weight"


@pytest.mark.parametrize("kind", KINDS, indirect=True)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_weights_stores_clean_keys_and_loads_into_any_form(
    kind: str, suffix: str, tmp_path: Path
) -> None:
    source = _tiny(0)
    path = tk.save_weights(_wrap(kind, source), tmp_path / f"w{suffix}")
    stored = tk.load_state_dict(path)
    assert sorted(stored) == sorted(source.state_dict())  # clean keys
    for target_kind in ("plain", kind):
        target = _tiny(1)
        report = tk.load_weights(_wrap(target_kind, target), path)
        assert report.ok
        assert not report.renamed
        assert_state_equal(target.state_dict(), source.state_dict())


@pytest.mark.parametrize("kind", KINDS, indirect=True)
def test_old_prefixed_file_loads_into_wrapped_and_plain(kind: str, tmp_path: Path) -> None:
    """A file written from ``wrapped.state_dict()`` (prefixes included) still loads."""
    source = _wrap(kind, _tiny(0))
    path = tk.save_weights(source.state_dict(), tmp_path / "prefixed.safetensors")
    for target_kind in ("plain", kind):
        target = _tiny(1)
        report = tk.load_weights(_wrap(target_kind, target), path)
        assert report.ok
        assert report.renamed
        assert_state_equal(target.state_dict(), unwrap(source).state_dict())


@pytest.mark.parametrize("kind", KINDS, indirect=True)
def test_checkpoint_save_and_restore_wrapped_models(kind: str, tmp_path: Path) -> None:
    source = _tiny(0)
    wrapped = _wrap(kind, source)
    opt = torch.optim.Adam(wrapped.parameters())
    wrapped(torch.randn(5, 4)).sum().backward()
    opt.step()
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, model=wrapped, optimizer=opt)
    assert sorted(tk.load_state_dict(tmp_path / "ckpt")) == sorted(source.state_dict())
    for target_kind in ("plain", kind):
        target = _tiny(1)
        target_opt = torch.optim.Adam(target.parameters())
        mgr.restore(model=_wrap(target_kind, target), optimizer=target_opt)
        assert_state_equal(target.state_dict(), source.state_dict())
        assert_state_equal(target_opt.state_dict()["state"][0], opt.state_dict()["state"][0])


@pytest.mark.parametrize("kind", KINDS, indirect=True)
def test_restore_of_a_step_saved_with_prefixes(kind: str, tmp_path: Path) -> None:
    """A step whose model entry kept the wrapper prefixes (an older torchkeep, or a state dict
    passed by hand) restores into the plain model and into the wrapped one."""
    source = _wrap(kind, _tiny(0))
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, model=source.state_dict())
    for target_kind in ("plain", kind):
        target = _tiny(1)
        mgr.restore(model=_wrap(target_kind, target))
        assert_state_equal(target.state_dict(), unwrap(source).state_dict())


def test_a_submodule_named_module_is_not_a_wrapper(tmp_path: Path) -> None:
    """Keys that start with ``module.`` because the model has a child of that name keep it."""

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    source, target = Outer(), Outer()
    assert matching_view(target, list(source.state_dict())) is target
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, model=source)
    mgr.restore(model=target)
    assert_state_equal(target.state_dict(), source.state_dict())


@pytest.mark.parametrize("kind", ["compile", "ddp"], indirect=True)
def test_save_model_of_a_wrapped_model(kind: str, tmp_path: Path) -> None:
    net = Net().eval()
    tk.save_model(_wrap(kind, net), tmp_path / "net.bundle")
    loaded = tk.load_model(tmp_path / "net.bundle")
    assert type(loaded) is Net
    assert_state_equal(loaded.state_dict(), net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), net(x))


@pytest.mark.onnx
@pytest.mark.parametrize("kind", ["compile", "ddp"], indirect=True)
def test_export_onnx_of_a_wrapped_model(kind: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    net = _tiny(0).eval()
    report = tk.export_onnx(_wrap(kind, net), torch.randn(2, 4), tmp_path / "m.onnx")
    assert report.batch_sizes
    names = {init.name for init in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert not any(name.startswith(("_orig_mod", "module.")) for name in names)
