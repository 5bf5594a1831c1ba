"""Sharded checkpoints saved by N gloo ranks (FSDP2, DDP, a Shard(1) DTensor) and restored on
any M, in spawned processes (tests/_dist_harness.py); failure, corruption, async, retention."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file

import torchkeep as tk
from tests import _dist_harness as harness
from tests import _dist_workers
from tests._compat import needs_sharded_checkpoints
from torchkeep.cli import main

pytestmark = [
    needs_sharded_checkpoints,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Any]]:
    """4 FSDP2 ranks: the replicated check, steps 3 and 5, a failing rank, retention, async."""
    out = tmp_path_factory.mktemp("dist")
    return out, harness.run("save_many", 4, {"out": str(out)}).ok()


def test_save_on_four_ranks(saved: tuple[Path, dict[int, Any]]) -> None:
    out, results = saved
    for rank, report in results.items():
        assert report["own_group"], rank
        # a replicated entry that differs names the entry and suggests per_rank=
        assert "'lr_note'" in report["mismatch"]
        assert "per_rank=" in report["mismatch"]
        # a rank raising in write_data: every rank raises, nothing committed
        assert report["fail"][0] == "DistributedCheckpointError"
        assert 2 in report["fail"][1]
        assert report["steps_after_fail"] == [3]
        assert report["kept"] == [3, 4]
        # async: an injected write error surfaces at the next save() on every rank
        assert report["async_error"], rank
        assert report["async_steps"] == [1]
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000003", "step-00000005"]
    step = ckpt / "step-00000005"
    assert sorted(p.name for p in step.iterdir()) == [
        "manifest.json",
        "shard-00000-of-00004.safetensors",
        "shard-00001-of-00004.safetensors",
        "shard-00002-of-00004.safetensors",
        "shard-00003-of-00004.safetensors",
        "state.json",
    ]


def test_restore_on_four_ranks_with_rng_and_bit_exact_resume(
    saved: tuple[Path, dict[int, Any]],
) -> None:
    out, _ = saved
    ctx = {"out": str(out), "dirs": [("ckpt", "ref5.safetensors")], "saved_world": 4}
    results = harness.run("restore_check", 4, {**ctx, "resume": True, "seen": True}).ok()
    for rank, report in results.items():
        entry = report["ckpt"]
        assert entry["step"] == 5
        assert entry["epoch"] == 2
        assert entry["mismatch"] == [], rank
        assert entry["rng_equal"], rank  # each rank's own generator state
        assert entry["seen"] == 10 * rank  # per_rank= entries come back per rank
        assert not entry["skipped"]
        # 3 more steps after the restore end bit-identical to the straight run
        assert entry["resume_mismatch"] == [], rank


def _model_chunk_offset(state: dict[str, Any], file: str) -> int:
    for key, tensor in state["tensors"].items():
        for chunk in tensor["chunks"]:
            if key.startswith("model/") and chunk["file"] == file and chunk["length"]:
                return int(chunk["offset"])
    raise AssertionError(f"no model chunk in {file}")


def _damaged_copies(out: Path) -> list[tuple[str, str]]:
    """Copies of the checkpoint whose newest step has a flipped byte, a truncated shard, or a
    deleted shard; each must fall back to step 3."""
    dirs = []
    for kind in ("flipped", "truncated", "deleted"):
        copy = out / kind
        if not copy.exists():
            shutil.copytree(out / "ckpt", copy)
            shard = copy / "step-00000005" / "shard-00001-of-00004.safetensors"
            data = bytearray(shard.read_bytes())
            if kind == "flipped":  # a byte of a model chunk (every restore reads those)
                state = json.loads((shard.parent / "state.json").read_text())
                data[_model_chunk_offset(state, shard.name)] ^= 0x01
                shard.write_bytes(bytes(data))
            elif kind == "truncated":
                shard.write_bytes(bytes(data[:-8]))
            else:
                shard.unlink()
        dirs.append((kind, "ref3.safetensors"))
    return dirs


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps of a single-process manager, their full states, and a damaged copy."""
    out = tmp_path_factory.mktemp("single")
    _dist_workers.single_steps(out)
    return out


def test_restore_on_two_ranks_resharded_and_damaged_steps_fall_back(
    saved: tuple[Path, dict[int, Any]], single: Path
) -> None:
    out, _ = saved
    for name in ("single", "single-flipped"):  # steps saved without torch.distributed
        shutil.copytree(single / name, out / name, dirs_exist_ok=True)
    for ref in ("single-ref", "single1-ref"):
        shutil.copy(single / f"{ref}.safetensors", out)
    damaged = _damaged_copies(out)
    dirs = [
        ("ckpt", "ref5.safetensors"),
        *damaged,
        ("single", "single-ref.safetensors"),
        ("single-flipped", "single1-ref.safetensors"),
    ]
    explicit = {**{kind: 5 for kind, _ in damaged}, "single-flipped": 2}
    results = harness.run(
        "restore_check", 2, {"out": str(out), "dirs": dirs, "explicit": explicit, "seen": True}
    ).ok()
    for rank, report in results.items():
        assert report["ckpt"]["step"] == 5
        assert report["ckpt"]["mismatch"] == [], rank
        # another world size: the generators are left alone, with a warning
        assert report["ckpt"]["rng_warning"]
        # a per_rank= entry on another world size: refused unless allowed (then left alone)
        assert report["ckpt"]["seen"] == "refused"
        assert report["ckpt"]["seen_after_allow"] == -1
        for kind, _ in damaged:
            entry = report[kind]
            assert entry["step"] == 3, (kind, rank)  # every rank fell back together
            assert entry["mismatch"] == [], (kind, rank)
            assert any("step-00000005" in w for w in entry["skipped"]), (kind, rank)
            # asked for explicitly, the damaged step raises on every rank, nothing changed
            assert entry["explicit"] == "ChecksumMismatchError", (kind, rank)
            assert entry["explicit_untouched"], (kind, rank)
        # a step saved by one process restores on 2 FSDP2 ranks: full tensors resharded, the
        # optimizer's index-keyed state re-keyed by name; the generators left, with a warning
        entry = report["single"]
        assert (entry["step"], entry["epoch"], entry["mismatch"]) == (2, 2, []), rank
        assert entry["rng_warning"], rank
        assert entry["seen"] == 7  # a replicated stateful entry
        # damaged: every rank falls back together; asked for by number, every rank raises
        entry = report["single-flipped"]
        assert (entry["step"], entry["mismatch"]) == (1, []), rank
        assert any("step-00000002" in w for w in entry["skipped"]), rank
        assert entry["explicit"] == "ChecksumMismatchError", rank
        assert entry["explicit_untouched"], rank


def test_restore_in_one_process_without_a_group_and_without_pickle(
    saved: tuple[Path, dict[int, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = saved
    step = out / "ckpt" / "step-00000005"
    # only safetensors and JSON: no .metadata, no .distcp, no pickle anywhere
    for path in step.iterdir():
        data = path.read_bytes()
        assert not data.startswith(b"\x80"), path  # no pickle protocol header
        if path.suffix == ".json":
            json.loads(data)
        else:
            assert path.suffix == ".safetensors"
            with safe_open(str(path), "pt") as f:
                assert f.metadata()["torchkeep.layout"] == "sharded-v1"

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("restore unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ctx = {"out": str(out), "dirs": [("ckpt", "ref5.safetensors")]}
    report = _dist_workers.restore_check(0, 1, ctx)["ckpt"]
    assert report["step"] == 5
    assert report["mismatch"] == []
    assert report["rng_warning"]  # saved by 4 ranks: the generators are not restored


def test_async_step_holds_the_state_at_the_call(saved: tuple[Path, dict[int, Any]]) -> None:
    out, _ = saved  # training went on right after save() returned
    ctx = {"out": str(out), "dirs": [("async", "async-ref.safetensors")]}
    report = _dist_workers.restore_check(0, 1, {**ctx, "only": ["model", "optimizer"]})
    assert report["async"]["step"] == 1
    assert report["async"]["mismatch"] == []


def test_dcp_huggingface_reader_reads_a_torchkeep_step(saved: tuple[Path, dict[int, Any]]) -> None:
    out, _ = saved
    step = out / "ckpt" / "step-00000005"
    state = json.loads((step / "state.json").read_text())
    reference = load_file(str(out / "ref5.safetensors"))
    wanted = {
        key: torch.zeros(t["shape"], dtype=getattr(torch, t["dtype"]))
        for key, t in state["tensors"].items()
        if key.startswith(("model/", "optimizer/"))
    }
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(step)), no_dist=True)
    assert len(wanted) == len(reference) - 2  # all but the DTensor "tp" and the lr
    for key, tensor in wanted.items():
        assert torch.equal(tensor, reference[key.replace("/", ".", 1)]), key


def test_ddp_round_trip(tmp_path: Path, single: Path) -> None:
    results = harness.run("ddp_roundtrip", 2, {"out": str(tmp_path), "single": str(single)}).ok()
    for rank, report in results.items():
        assert report["step"] == 2
        assert report["mismatch"] == [], rank
        assert report["rng_equal"], rank
        # a step saved by one process restores on 2 DDP ranks, every tensor equal
        entry = report["single"]
        assert (entry["step"], entry["epoch"], entry["mismatch"]) == (2, 2, []), rank
        assert entry["rng_warning"], rank
    # DDP's "module." prefix is not stored: the step restores into a plain module
    ctx = {"out": str(tmp_path), "dirs": [("ddp", "ddp-ref.safetensors")], "mode": "plain"}
    assert _dist_workers.restore_check(0, 1, ctx)["ddp"]["mismatch"] == []


def test_a_sigkilled_rank_makes_every_other_rank_raise(tmp_path: Path) -> None:
    outcome = harness.run("killed_save", 4, {"out": str(tmp_path), "victim": 0})
    assert outcome.exit_codes[0] == -signal.SIGKILL
    assert not outcome.errors
    assert sorted(outcome.results) == [1, 2, 3]
    for rank, text in outcome.results.items():
        assert text.startswith("DistributedCheckpointError"), (rank, text)
    ckpt = tmp_path / "ckpt"
    assert tk.CheckpointManager(ckpt).steps == []  # nothing committed
    debris = [p for p in ckpt.iterdir() if p.name.startswith(".step-00000007.tmp-")]
    assert debris  # the dead coordinator's temporary directory
    # the next save removes it
    tk.CheckpointManager(ckpt).save(1, model=torch.nn.Linear(2, 2))
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000001"]


def test_convert_consolidates_a_sharded_step_zero_dim_tensors_included(
    saved: tuple[Path, dict[int, Any]], tmp_path: Path
) -> None:
    out, _ = saved
    step = out / "ckpt" / "step-00000005"
    target = tmp_path / "full.safetensors"
    assert main(["convert", str(step), str(target)]) == 0
    merged = load_file(str(target))
    reference = load_file(str(out / "ref5.safetensors"))
    zero_dim = [k for k in merged if merged[k].dim() == 0]
    assert zero_dim  # AdamW's step counters
    for key, tensor in merged.items():
        name = "tp" if key == "tp/w" else key.replace("/", ".", 1)
        assert torch.equal(tensor, reference[name]), key
    assert not any(k.startswith("torchkeep.rank-") for k in merged)
    # a damaged chunk: nothing is written
    damaged = tmp_path / "damaged"
    shutil.copytree(step, damaged / "step-00000005")
    shard = damaged / "step-00000005" / "shard-00000-of-00004.safetensors"
    data = bytearray(shard.read_bytes())
    state = json.loads((shard.parent / "state.json").read_text())
    data[_model_chunk_offset(state, shard.name)] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(tk.ChecksumMismatchError):
        tk.checkpoint.consolidate(shard.parent, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_ls_inspect_verify_understand_sharded_steps(
    saved: tuple[Path, dict[int, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = saved
    ckpt = out / "ckpt"
    assert tk.verify(ckpt).ok
    assert main(["ls", str(ckpt)]) == 0
    assert main(["ls", "--json", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["verify", str(ckpt / "step-00000005")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(ckpt / "step-00000005")]) == 0
    shown = capsys.readouterr().out
    assert "sharded-v1" in shown
    assert "shard-00003-of-00004.safetensors:" in shown  # each rank's file and its chunks
    # verify reads every byte: damage in a chunk no restore on 2 ranks reads is reported too
    for kind in ("flipped", "truncated", "deleted"):
        report = tk.verify(out / kind / "step-00000005") if (out / kind).exists() else None
        if report is not None:
            assert not report.ok, kind


def test_fsdp_by_tensor_parallel_2x2_mesh(tmp_path: Path) -> None:
    results = harness.run("mesh_2x2", 4, {"out": str(tmp_path)}).ok()
    for rank, report in results.items():
        assert report["step"] == 2
        assert report["mismatch"] == [], rank
    # and on one process, into a plain model
    ctx = {"out": str(tmp_path), "dirs": [("mesh", "mesh-ref.safetensors")], "mode": "plain"}
    report = _dist_workers.restore_check(0, 1, {**ctx, "only": ["model", "optimizer"]})
    assert report["mesh"]["mismatch"] == []


def test_load_state_dict_and_export_torch_read_sharded_steps(
    saved: tuple[Path, dict[int, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = saved
    ckpt = out / "ckpt"
    reference = load_file(str(out / "ref5.safetensors"))
    model_ref = {k.split(".", 1)[1]: v for k, v in reference.items() if k.startswith("model.")}
    assert model_ref
    # one process, no process group: the step and the folder (newest step) give full tensors
    for source in (ckpt / "step-00000005", ckpt):
        got = tk.load_state_dict(source)
        assert sorted(got) == sorted(model_ref), source
        assert all(torch.equal(got[k], model_ref[k]) for k in got), source
    # export_torch: the tutorial-style dict of full tensors, loadable weights-only; the
    # per_rank= entry (one value per rank) is left out, and a warning says so
    with pytest.warns(UserWarning, match=r"per-rank entries \['seen'\]"):
        exported = tk.CheckpointManager(ckpt).export_torch(None, tmp_path / "latest.pt")
    data = torch.load(exported, weights_only=True)
    assert not any("seen" in key or "rng" in key for key in data)
    assert data["step"] == 5
    assert all(torch.equal(data["model_state_dict"][k], model_ref[k]) for k in model_ref)
    assert "state" in data["optimizer_state_dict"]
    assert "scheduler_state_dict" in data
    # a damaged chunk is refused before any tensor is returned
    damaged = tmp_path / "damaged" / "step-00000005"
    shutil.copytree(ckpt / "step-00000005", damaged)
    shard = damaged / "shard-00000-of-00004.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[_model_chunk_offset(json.loads((damaged / "state.json").read_text()), shard.name)] ^= 1
    shard.write_bytes(bytes(blob))
    with pytest.raises(tk.ChecksumMismatchError):
        tk.load_state_dict(damaged)
    with pytest.raises(tk.ChecksumMismatchError):
        tk.CheckpointManager(damaged.parent).export_torch(5, tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Any]]:
    """2 FSDP2 ranks: steps 1 and 2, restored as they are and with faults on one rank."""
    out = tmp_path_factory.mktemp("gate")
    return out, harness.run("restore_gate", 2, {"out": str(out)}).ok()


def test_a_restore_that_passes_agrees_with_one_flag(gate: tuple[Path, dict[int, Any]]) -> None:
    for rank, report in gate[1].items():
        assert report["restored_equal"], rank
        # the candidates broadcast, one flag before the first live copy and one after the
        # load: no object gathered (dcp.load would gather and scatter the plans, then gather)
        assert report["collectives"] == {
            "all_gather_object": 0,
            "broadcast_object_list": 1,
            "all_reduce": 2,
            "barrier": 0,
        }, rank


def test_generator_states_malformed_on_one_rank_change_nothing_on_any(
    gate: tuple[Path, dict[int, Any]],
) -> None:
    """Every chunk verifies, but the last rank's generator states are malformed: the check
    runs before the ranks agree, so no rank has copied a byte into its model."""
    for rank, report in gate[1].items():
        refused = report["rng_explicit"]
        assert refused["error"] == "InvalidDocumentError", rank
        assert refused["untouched"], rank
        fallback = report["rng_fallback"]
        assert fallback["step"] == 1, rank
        assert fallback["equal"], rank
        assert any("step-00000002" in w for w in fallback["skipped"]), rank


def test_a_mismatch_on_one_rank_raises_on_every_rank_and_changes_nothing(
    gate: tuple[Path, dict[int, Any]],
) -> None:
    results = gate[1]
    last = max(results)
    for rank, report in results.items():
        refused = report["mismatch"]
        assert refused["untouched"], rank
        if rank == last:  # its own error
            assert refused["error"] == "StateDictMismatchError"
        else:  # names the rank and carries its cause
            assert refused["error"] == "DistributedCheckpointError", rank
            assert refused["failures"] == {last: "StateDictMismatchError"}, rank


def test_a_rank_failing_after_every_rank_verified_makes_every_rank_raise(
    gate: tuple[Path, dict[int, Any]],
) -> None:
    results = gate[1]
    last = max(results)
    for rank, report in results.items():
        if rank == last:
            assert report["late"] == ("RuntimeError", {}), rank
        else:
            assert report["late"] == ("DistributedCheckpointError", {last: "RuntimeError"}), rank


def test_a_rank_killed_during_a_restore_makes_the_others_raise(
    gate: tuple[Path, dict[int, Any]],
) -> None:
    out, _ = gate
    outcome = harness.run("killed_restore", 2, {"out": str(out), "victim": 1})
    assert outcome.exit_codes[1] == -signal.SIGKILL
    assert not outcome.errors
    report = outcome.results[0]
    assert report["error"] is not None
    assert "the restore of" in report["error"]
    assert report["untouched"]
