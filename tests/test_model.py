"""Model bundles: save_model / load_model, Keepable, aliases, programs in a fresh process."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests._compat import save_torchscript, skip_unless_programs_load
from tests._source import SRC
from tests.conftest import TiedLM, assert_state_equal
from torchkeep.describe import describe
from torchkeep.formats import Format
from torchkeep.model import bundle as bundle_module
from torchkeep.models import Net


class Wide(tk.Keepable, nn.Module):
    """Constructor arguments of every JSON kind, and a non-persistent buffer."""

    def __init__(
        self,
        width: int,
        layers: tuple[int, ...] = (4,),
        options: dict[str, object] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.options = options or {}
        sizes = (3, width, *layers)
        self.body = nn.Sequential(
            *[nn.Linear(a, b, dtype=dtype) for a, b in itertools.pairwise(sizes)]
        )
        self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x) * self.scale
        return out


class Deeper(Wide):
    def __init__(self, depth: int = 2) -> None:
        super().__init__(width=5, layers=(6,) * depth)


class Holder(tk.Keepable, nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


class Needs(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3, hidden)


def test_bundle_round_trip_is_bit_exact_and_in_eval_mode(tmp_path: Path, net: Net) -> None:
    bundle = tk.save_model(net, tmp_path / "net.bundle")
    assert sorted(p.name for p in bundle.iterdir()) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
    ]
    loaded = tk.load_model(bundle)
    assert type(loaded) is Net
    assert not loaded.training
    assert_state_equal(net.state_dict(), loaded.state_dict())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "torchkeep.bundle"
    assert tk.load_state_dict(bundle).keys() == net.state_dict().keys()


def test_keepable_records_arguments_of_every_kind(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Wide(7, layers=(4, 2), options={"act": "relu", "p": [0.5]}, dtype=torch.float64)
    bundle = tk.save_model(model, tmp_path / "wide")
    config = json.loads((bundle / "config.json").read_text())
    assert config["class"] == "tests.test_model.Wide"
    assert config["init"]["kwargs"]["width"] == 7
    loaded = tk.load_model(bundle)
    assert isinstance(loaded, Wide)
    assert loaded.options == {"act": "relu", "p": [0.5]}
    assert loaded.body[0].weight.dtype == torch.float64
    assert torch.equal(loaded.scale, torch.full((1,), 2.0))  # non-persistent buffer rebuilt
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))


def test_keepable_subclass_records_its_own_arguments(tmp_path: Path) -> None:
    model = Deeper(depth=3)
    loaded = tk.load_model(tk.save_model(model, tmp_path / "deeper"))
    assert type(loaded) is Deeper
    assert len(loaded.body) == 4
    assert_state_equal(model.state_dict(), loaded.state_dict())


def test_unstorable_argument_is_named_at_save_time(tmp_path: Path) -> None:
    model = Holder(nn.Linear(2, 2))
    with pytest.raises(tk.InitArgsError, match=r"'inner' is an nn\.Module"):
        tk.save_model(model, tmp_path / "holder")
    assert not (tmp_path / "holder").exists()


def test_missing_init_args_are_listed_and_init_args_fill_them(tmp_path: Path) -> None:
    model = Needs(hidden=9)
    with pytest.raises(tk.InitArgsError, match="needs hidden"):
        tk.save_model(model, tmp_path / "needs")
    with pytest.raises(tk.InitArgsError, match="would not rebuild"):
        tk.save_model(model, tmp_path / "needs", init_args={"hidden": 4})
    loaded = tk.load_model(tk.save_model(model, tmp_path / "needs", init_args={"hidden": 9}))
    assert_state_equal(model.state_dict(), loaded.state_dict())


def test_tied_weights_stay_tied(tmp_path: Path, tied: TiedLM) -> None:
    loaded = tk.load_model(tk.save_model(tied, tmp_path / "lm"))
    assert loaded.head.weight is loaded.embed.weight
    assert_state_equal(tied.state_dict(), loaded.state_dict())


def test_moved_class_loads_with_an_alias(
    tmp_path: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle_module, "_ALIASES", {})  # register_alias is process-wide
    bundle = tk.save_model(net, tmp_path / "net")
    config = json.loads((bundle / "config.json").read_text())
    config["class"] = "old_project.models.Net"
    _rewrite(bundle, "config.json", json.dumps(config).encode())
    with pytest.raises(tk.ModelClassNotFoundError, match=r"old_project\.models\.Net") as info:
        tk.load_model(bundle)
    assert "aliases=" in str(info.value)
    assert "example_inputs" in str(info.value)  # no program to fall back on
    loaded = tk.load_model(bundle, aliases={"old_project.models.Net": "torchkeep.models.Net"})
    assert_state_equal(net.state_dict(), loaded.state_dict())
    tk.register_alias("old_project.models.Net", "torchkeep.models.Net")
    assert type(tk.load_model(bundle)) is Net


def _rewrite(bundle: Path, name: str, data: bytes) -> None:
    """Replace a file and re-record the manifest, as a later tool would."""
    from torchkeep.hashing import hash_file
    from torchkeep.manifest import FileRecord, read_manifest, write_manifest

    (bundle / name).write_bytes(data)
    manifest = read_manifest(bundle)
    files = {n: FileRecord(*hash_file(bundle / n)) for n in manifest["files"]}
    (bundle / "manifest.json").unlink()
    write_manifest(bundle, kind="torchkeep.bundle", files=files)


def test_corrupted_bundle_is_refused(tmp_path: Path, net: Net) -> None:
    bundle = tk.save_model(net, tmp_path / "net")
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(tk.ChecksumMismatchError, match=r"model\.safetensors"):
        tk.load_model(bundle)


def test_save_replaces_a_bundle_but_never_another_directory(tmp_path: Path, net: Net) -> None:
    bundle = tk.save_model(net, tmp_path / "net")
    tk.save_model(Net(), bundle)  # replaced atomically
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(tk.FileFormatError, match="not a torchkeep bundle"):
        tk.save_model(net, other)
    assert (other / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


_CHILD = """
import json, sys, torch
import torchkeep as tk
try:
    import tests.test_model
except ImportError:
    pass
else:
    raise SystemExit("the class should not be importable here")
try:
    tk.load_model(sys.argv[1])
except tk.ModelClassNotFoundError as exc:
    assert "trust_program=True" in str(exc), exc
else:
    raise SystemExit("loaded without trust_program")
model = tk.load_model(sys.argv[1], trust_program=True)
inputs = torch.load(sys.argv[2], weights_only=True)
torch.save([model(x) for x in inputs], sys.argv[3])
"""


def test_program_runs_in_a_process_without_the_class(tmp_path: Path) -> None:
    skip_unless_programs_load()
    torch.manual_seed(0)
    model = Wide(6, layers=(5, 4)).eval()
    bundle = tk.save_model(model, tmp_path / "wide", example_inputs=torch.randn(1, 3))
    inputs = [torch.randn(batch, 3) for batch in (1, 2, 7)]
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(bundle), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    outputs = torch.load(tmp_path / "out.pt", weights_only=True)
    for x, out in zip(inputs, outputs, strict=True):
        assert out.shape[0] == x.shape[0]
        torch.testing.assert_close(out, model(x))


def test_program_loads_directly_only_when_trusted(net_bundle: Path) -> None:
    program = net_bundle / "program.pt2"
    with pytest.raises(tk.UnsafeCheckpointError, match="trust_program=True"):
        tk.load_model(program)
    skip_unless_programs_load()
    module = tk.load_model(program, trust_program=True)
    reference = tk.load_model(net_bundle)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(module(x), reference(x))


def test_pickle_files_are_not_bundles(tmp_path: Path, net: Net) -> None:
    torch.save(net, tmp_path / "net.pt")
    with pytest.raises(tk.FileFormatError, match="load_pickled_model"):
        tk.load_model(tmp_path / "net.pt")


def test_unexportable_model_raises_export_error_and_writes_nothing(tmp_path: Path) -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(tk.ExportError, match="Branchy"):
        tk.save_model(Branchy(), tmp_path / "b", example_inputs=torch.ones(1, 2))
    assert list(tmp_path.iterdir()) == []


def test_inspect_describes_bundles_programs_and_torchscript(
    net_bundle: Path, tmp_path: Path
) -> None:
    skip_unless_programs_load()  # torch 2.4 writes another program layout
    bundle = describe(net_bundle)
    assert bundle.format == Format.BUNDLE
    assert dict(bundle.sections["bundle"])["class"] == "torchkeep.models.Net"
    assert bundle.parameter_count == sum(p.numel() for p in Net().parameters())
    program = describe(net_bundle / "program.pt2")
    assert program.format == Format.PT2
    assert {t.name for t in program.tensors} == set(Net().state_dict())
    assert any("trust_program=True" in note for note in program.notes)
    scripted = tmp_path / "net.ts"
    save_torchscript(Net(), scripted)
    ts = describe(scripted)
    assert ts.format == Format.TORCHSCRIPT
    assert any("deprecated" in note for note in ts.notes)


def test_demo_model_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    skip_unless_programs_load()  # the demo loads the program with trust_program=True
    from torchkeep.cli.demo import _model_step

    monkeypatch.setenv("PYTHONPATH", str(SRC))
    _model_step(tmp_path)
    out = capsys.readouterr().out
    assert out.count("same outputs True") == 2


_SCRIPT = """
import sys
import torch
from torch import nn
import torchkeep as tk

class Script(tk.Keepable, nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(2, width)

bundle = tk.save_model(Script(width=5), sys.argv[1])
loaded = tk.load_model(bundle)
assert type(loaded) is Script and loaded.fc.out_features == 5
print("ok")
"""


def test_a_class_defined_in_a_script_round_trips_in_that_script(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "script.bundle")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.stdout.strip() == "ok", result.stderr
    config = json.loads((tmp_path / "script.bundle" / "config.json").read_text())
    assert config["class"] == "__main__.Script"
