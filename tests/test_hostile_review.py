"""Attacks from the adversarial review of the hardening (issue 8), beyond the per-class suites.

Each test plants what an attacker (or an earlier run) could leave in a folder or file and checks
the promise it targets; where a plain loader is the victim, the payload is proven live first.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests._compat import skip_unless_dynamo_onnx
from torchkeep.cli import main
from torchkeep.hashing import hash_file
from torchkeep.models import Net


def _step_folder(directory: Path, step: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    with tk.CheckpointManager(directory, keep_last=None) as mgr:
        return mgr.save(step, model=nn.Linear(3, 2))


@pytest.mark.parametrize("planted", ["symlink", "copy"])
def test_a_newer_planted_step_does_not_make_save_delete_the_step_it_just_wrote(
    tmp_path: Path, planted: str
) -> None:
    """keep_last=1 with step 50 already in the folder (an earlier run's, or planted as a link
    to a valid step elsewhere): before the fix, save(3) retired step 3 at once, so every save
    of the new run deleted itself and training kept nothing."""
    outside = _step_folder(tmp_path / "elsewhere", 50)
    directory = tmp_path / "ckpt"
    _step_folder(directory, 1)
    if planted == "symlink":
        os.symlink(outside, directory / outside.name)
    else:
        _step_folder(directory, 50)
    torch.manual_seed(7)
    model = nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: every deletion works
        with tk.CheckpointManager(directory, keep_last=1) as mgr:
            mgr.save(3, model=model)
            assert 3 in mgr.steps
            mgr.save(4, model=model)
    assert mgr.steps == [4, 50]  # 3 retired by the next save, 1 by the first
    restored = nn.Linear(3, 2)
    mgr.restore(4, model=restored)
    assert torch.equal(restored.weight, model.weight)
    # whatever was linked in is never deleted through the link
    assert sorted(p.name for p in outside.iterdir()) == sorted(
        ["manifest.json", "state.json", "model.safetensors", "torchkeep.rng.safetensors"]
    )


def test_a_file_named_debug_after_double_dash_prints_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``torchkeep verify -- --debug`` names a file; before the fix the guard saw ``--debug``
    among the arguments and printed the traceback of the (expected) refusal."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORCHKEEP_DEBUG", raising=False)
    tk.save_weights({"a": torch.ones(2)}, tmp_path / "--debug.safetensors")
    os.rename(tmp_path / "--debug.safetensors", tmp_path / "--debug")
    assert main(["verify", "--", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "is not a torchkeep checkpoint step" in err
    assert main(["verify", "--debug", "--", "--debug"]) == 2  # the option itself still works
    assert "Traceback" in capsys.readouterr().err


def test_retiring_a_linked_step_removes_the_link_never_its_target(tmp_path: Path) -> None:
    """A step directory that is a symlink to a valid step elsewhere: retention used to rename
    the link and fail to rmtree it (a misleading 'could not be deleted, free the space' warning,
    and a hidden link left forever); now the link goes and the target is untouched."""
    outside = _step_folder(tmp_path / "elsewhere", 1)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    directory = tmp_path / "ckpt"
    directory.mkdir()
    os.symlink(outside, directory / outside.name)
    stale = directory / ".step-00000009.tmp-999999999-deadbeef"  # a dead writer's temp name
    os.symlink(outside, stale)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tk.CheckpointManager(directory, keep_last=1) as mgr:
            mgr.save(2, model=nn.Linear(3, 2))
            mgr.save(3, model=nn.Linear(3, 2))
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000003"]
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


@pytest.mark.parametrize(
    "pid",
    ["99999999999999999999", "\u00b2", "0", "4294967296"],
    ids=["overflow", "superscript-two", "zero", "past-pid_t"],
)
def test_a_temp_name_with_an_impossible_pid_does_not_block_saving(tmp_path: Path, pid: str) -> None:
    """Every save first removes temporaries of dead writers, reading the writer's pid from the
    name. A planted ``.x.tmp-<pid>-a`` with a pid past pid_t made os.kill raise OverflowError,
    and one with '²' (a digit to str.isdigit, not to int) a ValueError: every save of the folder
    failed with a raw error. Such a name is no live writer's: it is removed like a dead one's."""
    directory = tmp_path / "ckpt"
    (directory / f".x.tmp-{pid}-a").mkdir(parents=True)
    mgr = tk.CheckpointManager(directory)
    mgr.save(1, model=nn.Linear(3, 2))
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000001"]


def test_export_onnx_summary_never_sends_an_escape_sequence_to_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The export summary escaped rich markup only: the output path and torch's fallback
    message (which can quote names from the model or a file) reached the terminal with their
    ESC bytes, so an OSC/CSI sequence could retitle or clear it."""
    from torchkeep.cli.export_onnx import print_report
    from torchkeep.onnx import OnnxReport

    hostile = "\x1b]0;PWNED\x07\x1b[2J[red]x[/]"
    report = OnnxReport(
        path=tmp_path / f"{hostile}.onnx",
        exporter="torchscript",
        opset=18,
        inputs=["x"],
        outputs=["y"],
        dynamic_batch=True,
        export_batch_size=2,
        rtol=1e-4,
        atol=1e-5,
        fallback_reason=f"unsupported op in {hostile}",
    )
    print_report(report)
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "\\x1b]0;PWNED\\x07" in out  # shown literally
    assert "[red]x[/]" in out


def test_load_state_dict_and_restore_read_the_same_model_file_of_a_step(tmp_path: Path) -> None:
    """A rewritten step whose state.json points its 'model' entry at another listed file: the
    hashes all match, so restore() loads that file, but load_state_dict read model.safetensors
    regardless, so one valid step gave two readers two different models."""
    directory = tmp_path / "ckpt"
    step_dir = _step_folder(directory, 1, seed=1)
    torch.manual_seed(2)
    decoy = nn.Linear(3, 2)
    tk.save_weights(decoy, step_dir / "decoy.safetensors")
    state = json.loads((step_dir / "state.json").read_text())
    state["entries"]["model"]["file"] = "decoy.safetensors"
    (step_dir / "state.json").write_text(json.dumps(state))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    for name in ("state.json", "decoy.safetensors"):
        size, digest = hash_file(step_dir / name)
        manifest["files"][name] = {"size": size, "hash": digest}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))

    restored = nn.Linear(3, 2)
    tk.CheckpointManager(directory).restore(model=restored, restore_rng=False)
    assert torch.equal(restored.weight, decoy.weight)  # restore follows state.json
    for source in (directory, step_dir):
        loaded = tk.load_state_dict(source)
        assert torch.equal(loaded["weight"], decoy.weight)


@pytest.mark.parametrize(
    "name", ["\U0001f600" * 100, "\ud800"], ids=["over-255-bytes", "lone-surrogate"]
)
def test_an_entry_name_no_file_can_have_is_refused_before_anything_is_written(
    tmp_path: Path, name: str
) -> None:
    """Entry names were limited in characters only: 100 emoji (400 bytes as the file name
    ``<name>.safetensors``) raised a raw OSError (ENAMETOOLONG) mid-save, and a lone surrogate a
    raw UnicodeEncodeError, instead of UnsupportedValueError before the first byte."""
    directory = tmp_path / "ckpt"
    mgr = tk.CheckpointManager(directory)
    with pytest.raises(tk.UnsupportedValueError, match="rename it"):
        mgr.save(1, **{name: torch.ones(2)})
    assert mgr.steps == []
    assert not directory.exists() or list(directory.iterdir()) == []


def test_the_longest_entry_name_that_fits_a_file_name_still_round_trips(tmp_path: Path) -> None:
    name = "\U0001f600" * 60  # 240 bytes: <name>.safetensors is 252
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, **{name: torch.arange(3)})
    assert torch.equal(mgr.restore().extra[name], torch.arange(3))


@pytest.mark.parametrize("where", ["tensor-name", "metadata-key", "metadata-value", "checkpoint"])
def test_a_lone_surrogate_is_refused_before_a_safetensors_header_is_written(
    tmp_path: Path, where: str
) -> None:
    """A lone surrogate in a tensor name or metadata string passed every check and then made
    the UTF-8 header encoding raise a raw UnicodeEncodeError part way through the save."""
    bad = "w\ud800"
    path = tmp_path / "net.safetensors"
    with pytest.raises(tk.UnsupportedValueError, match="lone surrogate"):
        if where == "tensor-name":
            tk.save_weights({bad: torch.ones(2)}, path)
        elif where == "metadata-key":
            tk.save_weights({"w": torch.ones(2)}, path, metadata={bad: "x"})
        elif where == "metadata-value":
            tk.save_weights({"w": torch.ones(2)}, path, metadata={"k": bad})
        else:
            tk.CheckpointManager(tmp_path / "ckpt").save(1, state={bad: torch.ones(2)})
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []
    # a torch.save file has no such header: the same name is stored and read back
    tk.save_weights({bad: torch.ones(2)}, tmp_path / "net.pt")
    assert list(tk.load_state_dict(tmp_path / "net.pt")) == [bad]


def test_cli_warnings_never_send_an_escape_sequence_to_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A skipped step's warning quotes the file name its state.json gives; Python printed CLI
    warnings raw, so a name holding ESC/BEL reached the terminal as control sequences."""
    directory = tmp_path / "ckpt"
    first = _step_folder(directory, 1)
    step_dir = _step_folder(directory, 2)
    hostile = "\x1b]0;PWNED\x07\x1b[2J.safetensors"
    state = json.loads((step_dir / "state.json").read_text())
    state["entries"]["model"]["file"] = hostile
    (step_dir / "state.json").write_text(json.dumps(state))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    size, digest = hash_file(step_dir / "state.json")
    manifest["files"]["state.json"] = {"size": size, "hash": digest}
    manifest["files"][hostile] = {"size": 1, "hash": "00"}  # listed, never written
    (step_dir / "manifest.json").write_text(json.dumps(manifest))

    assert main(["diff", str(directory), str(first)]) == 0  # step 2 skipped, step 1 == step 1
    err = capsys.readouterr().err
    assert "warning: checkpoint step 2 is unusable and was skipped" in err
    assert "\\x1b]0;PWNED\\x07" in err  # shown literally
    assert "\x1b" not in err
    assert "\x07" not in err


@pytest.mark.parametrize("counter", [-1, 10**30], ids=["negative", "past-int64"])
def test_convert_of_a_tutorial_dict_with_an_impossible_epoch_is_no_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], counter: int
) -> None:
    """The dict's ``epoch`` becomes the step number; -1 or 10**30 (the file's values) raised
    the argument check's ValueError, which the CLI reported as 'unexpected ... a bug'."""
    source = tmp_path / "tutorial.pt"
    torch.save({"model_state_dict": nn.Linear(2, 2).state_dict(), "epoch": counter}, source)
    assert main(["convert", str(source), str(tmp_path / "ckpt")]) == 0
    assert "unexpected" not in capsys.readouterr().err
    restored = tk.CheckpointManager(tmp_path / "ckpt").restore()
    assert restored.step == 0
    assert restored.extra["epoch"] == counter  # the value itself is kept


@pytest.mark.parametrize("shape", ["99999999999,99999999", "100000,100000"])
def test_export_onnx_refuses_an_input_shape_no_example_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: str
) -> None:
    """--input-shape built the example tensor unbounded: 99999999999,99999999 made torch raise
    (reported as 'unexpected RuntimeError ... a bug'), 100000,100000 asked for 40 GB. It is now
    an argument error before anything is allocated, with the bound bundles' examples have."""
    with pytest.raises(SystemExit) as exit_info:
        main(["export-onnx", "torchkeep.models:Net", "-o", str(tmp_path / "x.onnx"),
              "--input-shape", shape])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "an example input holds at most 67,108,864" in err
    assert not (tmp_path / "x.onnx").exists()


def test_export_onnx_with_inputs_the_model_rejects_is_an_export_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commonest mistake, an input shape the model's layers reject, reached the CLI as
    'unexpected RuntimeError ... This is a bug in torchkeep'; it is an ExportError naming the
    shapes given."""
    pytest.importorskip("onnxscript")
    code = main(
        ["export-onnx", "torchkeep.models:Net", "-o", str(tmp_path / "x.onnx"),
         "--input-shape", "1,1,1"]  # Net wants 3 channels
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "unexpected" not in err
    assert "Net raised on the example inputs ([1, 1, 1]:float32)" in err
    with pytest.raises(tk.ExportError, match="pass inputs its forward accepts"):
        tk.export_onnx(Net(), torch.randn(1, 1, 1), tmp_path / "y.onnx")
    assert not (tmp_path / "x.onnx").exists()
    assert not (tmp_path / "y.onnx").exists()


def test_export_onnx_never_writes_another_opset_than_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--opset 1: onnxscript's converter failed, logged a Traceback to stderr, and the file was
    written at opset 18 with exit 0, as if opset 1 had been honoured."""
    pytest.importorskip("onnxscript")
    skip_unless_dynamo_onnx()
    target = tmp_path / "x.onnx"
    code = main(
        ["export-onnx", "torchkeep.models:Net", "-o", str(target), "--input-shape", "1,3,32,32",
         "--opset", "1", "--no-verify"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "could not produce opset 1" in err
    assert "Traceback" not in err
    assert not target.exists()


@pytest.mark.parametrize("value", ["nan", "-1"])
def test_export_onnx_refuses_a_tolerance_no_output_can_meet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """--rtol nan (or -1) was accepted, exported, and then failed verification for any model."""
    with pytest.raises(SystemExit) as exit_info:
        main(["export-onnx", "torchkeep.models:Net", "-o", str(tmp_path / "x.onnx"),
              "--input-shape", "1,3,32,32", "--rtol", value])  # fmt: skip
    assert exit_info.value.code == 2
    assert "is not a tolerance" in capsys.readouterr().err


def test_a_bundle_config_asking_for_a_huge_model_is_refused_before_allocation(
    tmp_path: Path,
) -> None:
    """The config's init arguments are the attacker's: Linear(10**6, 10**6) asked for 4 TB.
    The model is built on the meta device first, so its size is known before any memory is
    taken; it raised a raw RuntimeError from the allocator (or, for a size that fits
    overcommit, could take the machine's memory). A model larger than the weights file it must
    load is refused with InitArgsError before it is allocated."""
    bundle = tk.save_model(
        nn.Linear(2, 2), tmp_path / "lin", init_args={"in_features": 2, "out_features": 2}
    )
    config = json.loads((bundle / "config.json").read_text())
    config["init"]["kwargs"] = {"in_features": 10**6, "out_features": 10**6}
    (bundle / "config.json").write_text(json.dumps(config))
    manifest = json.loads((bundle / "manifest.json").read_text())
    size, digest = hash_file(bundle / "config.json")
    manifest["files"]["config.json"] = {"size": size, "hash": digest}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(tk.InitArgsError, match="4,000,004,000,000 bytes"):
        tk.load_model(bundle)


def test_a_step_whose_model_entry_names_no_file_is_skipped_by_load_state_dict(
    tmp_path: Path,
) -> None:
    """Found by the document fuzzer once load_state_dict followed state.json: a model entry
    with ``"file": null`` while the manifest lists model.safetensors is a damaged step, skipped
    with a warning like any other, not a FileFormatError that stops the fallback."""
    directory = tmp_path / "ckpt"
    _step_folder(directory, 1, seed=1)
    step_dir = _step_folder(directory, 2, seed=2)
    state = json.loads((step_dir / "state.json").read_text())
    state["entries"]["model"]["file"] = None
    (step_dir / "state.json").write_text(json.dumps(state))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    size, digest = hash_file(step_dir / "state.json")
    manifest["files"]["state.json"] = {"size": size, "hash": digest}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    torch.manual_seed(1)
    expected = nn.Linear(3, 2).weight
    with pytest.warns(UserWarning, match="step 2 is unusable.*names no tensor file"):
        loaded = tk.load_state_dict(directory)
    assert torch.equal(loaded["weight"], expected)
