"""Format versions: every document records one; a newer one is refused, naming the upgrade.

Each test hand-edits a real file to ``format_version: 99`` (rehashing the manifest where the
document is hashed, so the version check, not the hash check, is what refuses it) and asserts
``tk.FormatVersionError`` naming the file and the version. Older documents, which record no
version, still load (the golden sets of tests/test_golden.py hold real ones).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import torchkeep as tk
from torchkeep import format_versions as fv
from torchkeep.cli import main
from torchkeep.hashing import hash_file
from torchkeep.manifest import write_manifest

GOLDEN = sorted((Path(__file__).parent / "golden").glob("format-v1-torch-*"))[-1]
NEWER = r"format version 99; this torchkeep \(.*\) reads versions .*upgrade to a torchkeep"


def _edit(path: Path, **changes: Any) -> None:
    """Set fields of the JSON document at ``path`` (None removes one), and if its folder has a
    manifest listing it, record the new size and hash there."""
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    path.write_text(json.dumps(document, indent=2))
    manifest_path = path.parent / "manifest.json"
    if path != manifest_path and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        size, digest = hash_file(path)
        manifest["files"][path.name] = {"size": size, "hash": digest}
        manifest_path.write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A writable copy of the newest golden set."""
    shutil.copytree(GOLDEN, tmp_path / "golden")
    return tmp_path / "golden"


def test_the_table_lists_each_kind_with_the_release_of_each_version() -> None:
    table = {kind.name: (kind.writes, dict(kind.introduced)) for kind in fv.KINDS}
    assert table == {
        "weights": (1, {1: "0.1.0"}),
        "checkpoint": (1, {1: "0.1.0", 2: "0.3.0"}),
        "bundle": (1, {1: "0.1.0", 2: "0.3.0"}),
        "onnx report": (1, {1: "0.1.0"}),
        "sealed folder": (1, {1: "0.3.0"}),
    }
    for kind in fv.KINDS:
        assert fv.check_version(kind, kind.newest, source="x") == kind.newest
        with pytest.raises(tk.FormatVersionError, match=r"x is .* format version 99"):
            fv.check_version(kind, 99, source="x")


def test_writers_record_the_version_they_write(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    tk.save_weights(model, tmp_path / "w.safetensors")
    bundle = tk.save_model(
        model, tmp_path / "net.bundle", init_args={"in_features": 2, "out_features": 2}
    )
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, model=model)
    step = tmp_path / "ckpt" / "step-00000001"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata()[fv.WEIGHTS_KEY] == str(fv.WEIGHTS.writes)
    for document, kind in (
        (step / "manifest.json", fv.CHECKPOINT),
        (step / "state.json", fv.CHECKPOINT),
        (bundle / "manifest.json", fv.BUNDLE),
        (bundle / "config.json", fv.BUNDLE),
    ):
        assert json.loads(document.read_text())["format_version"] == kind.writes, document


def test_a_layout_writer_records_a_newer_readable_version(tmp_path: Path) -> None:
    """What the sharded-checkpoint and builder-bundle writers call (version 2, torchkeep 0.3.0)."""
    write_manifest(tmp_path, kind="torchkeep.checkpoint", files={}, format_version=2, step=0)
    assert json.loads((tmp_path / "manifest.json").read_text())["format_version"] == 2
    with pytest.raises(tk.FormatVersionError, match="format version 3"):
        write_manifest(tmp_path, kind="torchkeep.bundle", files={}, format_version=3)


def test_weights_of_a_newer_format_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(load_file(GOLDEN / "net.bundle" / "model.safetensors"), path, {fv.WEIGHTS_KEY: "99"})
    with pytest.raises(tk.FormatVersionError, match=f"{path}.*{NEWER}"):
        tk.load_state_dict(path)
    assert main(["inspect", str(path)]) == 2
    with pytest.raises(tk.FormatVersionError, match=NEWER):
        tk.load_weights(torch.nn.Linear(3, 4), path, strict=False)
    save_file({"x": torch.zeros(1)}, path, {fv.WEIGHTS_KEY: "v2"})
    with pytest.raises(tk.CorruptFileError, match="not a format version number"):
        tk.load_state_dict(path)


@pytest.mark.parametrize("document", ["manifest.json", "state.json"])
def test_a_checkpoint_step_of_a_newer_format_is_refused(copy: Path, document: str) -> None:
    step = copy / "ckpt" / "step-00000003"
    _edit(step / document, format_version=99)
    mgr = tk.CheckpointManager(copy / "ckpt")
    with pytest.raises(tk.FormatVersionError, match=f"{step / document}.*{NEWER}"):
        mgr.restore(step=3, model=torch.nn.Linear(3, 4), restore_rng=False)
    if document == "manifest.json":  # not listed as a step, never retired, and said so
        assert mgr.steps == []
        with pytest.raises(tk.CheckpointNotFoundError):
            mgr.restore(restore_rng=False)
    else:  # listed, but skipped like a damaged step when it is the latest, with the reason
        with pytest.warns(UserWarning, match=NEWER), pytest.raises(tk.CheckpointNotFoundError):
            mgr.restore(restore_rng=False)
    report = tk.verify(copy / "ckpt")
    assert not report.ok
    assert any("format version 99" in problem for problem in report.problems)


@pytest.mark.parametrize("document", ["manifest.json", "config.json"])
def test_a_bundle_of_a_newer_format_is_refused(copy: Path, document: str) -> None:
    bundle = copy / "net.bundle"
    _edit(bundle / document, format_version=99)
    with pytest.raises(tk.FormatVersionError, match=f"{bundle / document}.*{NEWER}"):
        tk.load_model(bundle)
    assert main(["inspect", str(bundle)]) == 2


def test_an_onnx_report_of_a_newer_format_is_refused(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx = pytest.importorskip("onnx", reason="needs the onnx extra")
    from torchkeep.onnx.report import REPORT_KEY
    from torchkeep.onnx.stored_report import parse_stored_report

    path = copy / "net.onnx"
    model = onnx.load(str(path))
    (prop,) = [p for p in model.metadata_props if p.key == REPORT_KEY]
    prop.value = json.dumps({**json.loads(prop.value), "format_version": 99})
    onnx.save(model, str(path))
    with pytest.raises(tk.FormatVersionError, match=NEWER):
        parse_stored_report(prop.value, path=path)
    assert main(["inspect", str(path)]) == 0  # the model is still described, the report not
    assert "format version 99" in capsys.readouterr().out


def test_documents_without_a_version_are_version_1(copy: Path) -> None:
    """torchkeep 0.1.0 and 0.2.0 wrote no version in state.json, config.json or weights."""
    _edit(copy / "ckpt" / "step-00000003" / "state.json", format_version=None)
    _edit(copy / "net.bundle" / "config.json", format_version=None)
    model = tk.load_model(copy / "net.bundle")
    restored = tk.CheckpointManager(copy / "ckpt").restore(model=model, restore_rng=False)
    assert restored.step == 3
    assert tk.verify(copy / "ckpt").ok
    assert tk.verify(copy / "net.bundle").ok
