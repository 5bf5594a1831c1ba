"""Round-2 attacks on the surfaces that read attacker-controlled files: DCP imports and sharded
steps, builder bundles, save_pretrained folders and shard indexes, sealed trainer folders,
Lightning checkpoints, and programs whose outputs are registered pytree types.

The adversary controls the file or folder (and may rewrite its manifest consistently), not the
installed packages. Every code-running payload is first proven live against the plain loader
in the same test (tests/_live.py); then torchkeep is run on the same file, the canary must stay
absent, and the refusal must come from torchkeep's own gate (its error type and message).
Resource and memory-disclosure attacks (sizes the stored bytes do not back) are refused by the
gate before anything is allocated or written.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchkeep as tk
from tests._compat import (
    needs_sharded_checkpoints,
    require_transformers_with_torch,
    skip_unless_programs_load,
)
from tests._live import PICKLE_LOAD, TORCH_LOAD, prove_live
from torchkeep.checkpoint.distributed.dcp_import import read_dcp_metadata
from torchkeep.checkpoint.distributed.writer import TorchkeepStorageWriter
from torchkeep.cli import main
from torchkeep.errors import InvalidDocumentError
from torchkeep.hashing import hash_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

EMPTY_XXH3 = "99aa06d3014798d86001c324468d497f"  # xxh3_128 of no bytes


def _quiet_dcp_save(state: dict[str, Any], **kwargs: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, no_dist=True, **kwargs)


# ---- DCP .metadata: the allowlisted unpickler ----------------------------------------------


def _reduce(module: str, name: str, arg: bytes) -> bytes:
    """A protocol-2 pickle calling ``module.name(arg)``."""
    return (
        b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"C" + bytes([len(arg)]) + arg
        + b"\x85R."
    )  # fmt: skip


def _system(canary: Path) -> bytes:
    return _reduce("os", "system", f"touch {canary}".encode())


def _exec(canary: Path) -> bytes:
    # builtins is an allowlisted module (set, frozenset): the name must still be refused
    code = f"open({str(canary)!r}, 'w').close()".encode()
    return b"\x80\x02cbuiltins\nexec\nX" + len(code).to_bytes(4, "little") + code + b"\x85R."


def _protocol_zero(canary: Path) -> bytes:
    return f"cos\nsystem\n(S'touch {canary}'\ntR.".encode()


def _inst(canary: Path) -> bytes:
    return f"(S'touch {canary}'\nios\nsystem\n.".encode()


def _nested(canary: Path) -> bytes:
    # a bytes field unpickled by a second loads: the outer global must be refused
    return _reduce("pickle", "loads", _system(canary))


def _dotted_name(canary: Path) -> bytes:
    # a protocol-4 dotted name inside an allowlisted module: metadata.os.system
    arg = f"touch {canary}".encode()
    module = b"torch.distributed.checkpoint.metadata\nos.system\n"
    return b"\x80\x04c" + module + b"C" + bytes([len(arg)]) + arg + b"\x85R."


@pytest.mark.parametrize(
    "payload",
    [_system, _exec, _protocol_zero, _inst, _nested, _dotted_name],
    ids=lambda f: f.__name__,
)
@needs_sharded_checkpoints
def test_dcp_metadata_that_runs_code_is_refused(
    payload: Callable[[Path], bytes], tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    source = tmp_path / "dcp"
    _quiet_dcp_save({"x": torch.ones(2)}, checkpoint_id=str(source))
    (source / ".metadata").write_bytes(payload(canary))
    prove_live(PICKLE_LOAD, canary, path=source / ".metadata")
    with pytest.raises(tk.UnsafeCheckpointError, match="DCP metadata never holds"):
        tk.checkpoint.import_dcp(source, tmp_path / "ckpt")
    assert not canary.exists()
    assert not (tmp_path / "ckpt").exists()


def _dcp_with(tmp_path: Path, change: Callable[[Any, Path], None]) -> Path:
    """A real dcp.save checkpoint of two tensors whose Metadata ``change`` rewrites (pickled
    with the same allowlisted classes, as a hostile writer would)."""
    source = tmp_path / "dcp"
    _quiet_dcp_save({"x": torch.arange(8.0), "y": torch.ones(3)}, checkpoint_id=str(source))
    metadata = read_dcp_metadata(source)
    change(metadata, source)
    (source / ".metadata").write_bytes(pickle.dumps(metadata))
    return source


def _x_info(metadata: Any) -> Any:
    return next(info for index, info in metadata.storage_data.items() if index.fqn == "x")


def _huge_shape(metadata: Any, _: Path) -> None:
    metadata.state_dict_metadata["x"].size = torch.Size([1 << 40])


def _shape_beyond_its_chunk(metadata: Any, _: Path) -> None:
    metadata.state_dict_metadata["x"].size = torch.Size([16])  # half never stored


def _chunk_outside_the_shape(metadata: Any, _: Path) -> None:
    chunk = metadata.state_dict_metadata["x"].chunks[0]
    metadata.state_dict_metadata["x"].chunks[0] = type(chunk)(
        offsets=torch.Size([4]), sizes=chunk.sizes
    )


def _overlapping_chunks(metadata: Any, _: Path) -> None:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    described = metadata.state_dict_metadata["x"]
    described.size = torch.Size([12])
    described.chunks = [
        ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([8])),
        ChunkStorageMetadata(offsets=torch.Size([4]), sizes=torch.Size([4])),
    ]
    # y's stored record backs the second chunk (every item byte is claimed once)
    del metadata.state_dict_metadata["y"]
    metadata.storage_data[MetadataIndex("x", [4])] = metadata.storage_data.pop(
        MetadataIndex("y", [0])
    )


def _item_past_the_file(metadata: Any, _: Path) -> None:
    _x_info(metadata).offset = 1 << 40


def _negative_item_offset(metadata: Any, _: Path) -> None:
    _x_info(metadata).offset = -10


def _items_claim_more_than_stored(metadata: Any, _: Path) -> None:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    info = _x_info(metadata)
    for i in range(64):  # one stored record claimed by many values
        metadata.storage_data[MetadataIndex(f"copy{i}")] = info


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_huge_shape, "chunks of 8 elements for shape"),
        (_shape_beyond_its_chunk, "chunks of 8 elements for shape"),
        (_chunk_outside_the_shape, "outside its shape"),
        (_overlapping_chunks, "overlapping chunks 0 and 1"),
        (_item_past_the_file, "lies outside"),
        (_negative_item_offset, "has no valid place"),
        (_items_claim_more_than_stored, "more bytes than its files hold"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:],
)
@needs_sharded_checkpoints
def test_dcp_metadata_describing_unstored_bytes_is_refused_before_allocation(
    change: Callable[[Any, Path], None], message: str, tmp_path: Path
) -> None:
    source = _dcp_with(tmp_path, change)
    with pytest.raises(tk.CorruptFileError, match=message) as info:
        tk.checkpoint.import_dcp(source, tmp_path / "ckpt")
    assert ".metadata" in str(info.value)
    assert not (tmp_path / "ckpt").exists()


@needs_sharded_checkpoints
def test_a_dcp_item_naming_an_impossible_file_is_a_typed_error(tmp_path: Path) -> None:
    def point(metadata: Any, _: Path) -> None:
        _x_info(metadata).relative_path = "a\x00b.distcp"

    source = _dcp_with(tmp_path, point)
    with pytest.raises(tk.CorruptFileError, match="names no readable file"):
        tk.checkpoint.import_dcp(source, tmp_path / "ckpt")


@pytest.mark.parametrize("where", ["../outside.distcp", "/etc/hostname", "link.distcp"])
@needs_sharded_checkpoints
def test_dcp_items_outside_the_checkpoint_are_refused(where: str, tmp_path: Path) -> None:
    def point(metadata: Any, source: Path) -> None:
        real = next(source.glob("*.distcp"))
        shutil.copy(real, tmp_path / "outside.distcp")
        (source / "link.distcp").symlink_to(tmp_path / "outside.distcp")
        _x_info(metadata).relative_path = where

    source = _dcp_with(tmp_path, point)
    with pytest.raises(tk.UnsafeCheckpointError, match="outside the checkpoint"):
        tk.checkpoint.import_dcp(source, tmp_path / "ckpt")


@needs_sharded_checkpoints
def test_dcp_item_holding_another_tensor_than_described_is_a_typed_error(
    tmp_path: Path,
) -> None:
    def swap(metadata: Any, _: Path) -> None:
        x = _x_info(metadata)
        y = next(info for index, info in metadata.storage_data.items() if index.fqn == "y")
        x.offset, x.length, y.offset, y.length = y.offset, y.length, x.offset, x.length

    source = _dcp_with(tmp_path, swap)
    with pytest.raises(tk.CorruptFileError, match=r"not stored whole|does not hold the tensor"):
        tk.checkpoint.import_dcp(source, tmp_path / "ckpt")


# ---- sharded steps: the state.json tensor index --------------------------------------------


def _sharded_step(tmp_path: Path) -> Path:
    """A one-rank sharded step written by torchkeep's own DCP StorageWriter."""
    step = tmp_path / "ckpt" / "step-00000001"
    step.parent.mkdir(parents=True)
    state = {"model/w": torch.arange(6.0).reshape(2, 3), "model/b": torch.ones(3)}
    _quiet_dcp_save(state, storage_writer=TorchkeepStorageWriter(step, step=1))
    return step


def _forge_index(step: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite ``state.json``'s tensor index and re-record it in the manifest consistently."""
    state = json.loads((step / "state.json").read_text())
    change(state["tensors"])
    (step / "state.json").write_text(json.dumps(state))
    manifest = json.loads((step / "manifest.json").read_text())
    size, digest = hash_file(step / "state.json")
    manifest["files"]["state.json"] = {"size": size, "hash": digest}
    (step / "manifest.json").write_text(json.dumps(manifest))


def _b(tensors: dict[str, Any]) -> dict[str, Any]:
    chunk: dict[str, Any] = tensors["model/b"]["chunks"][0]
    return chunk


def _zero_length_chunk(tensors: dict[str, Any]) -> None:
    _b(tensors).update(length=0, hash=EMPTY_XXH3)  # would return uninitialised memory


def _zero_length_huge_chunk(tensors: dict[str, Any]) -> None:
    _b(tensors).update(length=0, hash=EMPTY_XXH3, sizes=[1 << 24])
    tensors["model/b"]["shape"] = [1 << 24]


def _shape_larger_than_chunks(tensors: dict[str, Any]) -> None:
    tensors["model/b"]["shape"] = [6]


def _terabyte_shape(tensors: dict[str, Any]) -> None:
    tensors["model/b"]["shape"] = [1 << 40]


def _chunk_outside_shape(tensors: dict[str, Any]) -> None:
    _b(tensors)["offsets"] = [2]


def _duplicated_chunk(tensors: dict[str, Any]) -> None:
    tensors["model/b"]["shape"] = [6]
    tensors["model/b"]["chunks"].append(dict(_b(tensors)))


def _wrong_rank(tensors: dict[str, Any]) -> None:
    _b(tensors).update(offsets=[0, 0], sizes=[3, 1])


def _chunk_in_the_index(tensors: dict[str, Any]) -> None:
    _b(tensors).update(file="state.json", offset=0, length=12)


def _unknown_dtype(tensors: dict[str, Any]) -> None:
    tensors["model/b"]["dtype"] = "os.system"


def _one_chunk_many_tensors(tensors: dict[str, Any]) -> None:
    for i in range(200):  # the same stored bytes claimed by many tensors
        tensors[f"model/copy{i}"] = json.loads(json.dumps(tensors["model/w"]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_zero_length_chunk, "0 bytes for 3"),
        (_zero_length_huge_chunk, "0 bytes for 16777216"),
        (_shape_larger_than_chunks, "chunks of 3 elements for shape"),
        (_terabyte_shape, "chunks of 3 elements for shape"),
        (_chunk_outside_shape, "outside its shape"),
        (_duplicated_chunk, "overlapping chunks 0 and 1"),
        (_wrong_rank, "1 offsets|2 offsets"),
        (_unknown_dtype, "unknown dtype"),
        (_chunk_in_the_index, "not a listed shard"),
        (_one_chunk_many_tensors, "more than the"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:],
)
@needs_sharded_checkpoints
def test_sharded_index_describing_unstored_bytes_is_refused_by_every_reader(
    change: Callable[[dict[str, Any]], None],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    step = _sharded_step(tmp_path)
    _forge_index(step, change)
    target = tmp_path / "full.safetensors"
    with pytest.raises(InvalidDocumentError, match=message) as info:
        tk.checkpoint.consolidate(step, target)
    assert "state.json" in str(info.value)
    assert "the step is damaged" in str(info.value)
    assert not target.exists()
    report = tk.verify(step.parent)
    assert not report.ok
    assert main(["convert", str(step), str(target)]) != 0
    assert "Traceback" not in capsys.readouterr().err
    assert not target.exists()


@needs_sharded_checkpoints
def test_a_clean_sharded_step_still_consolidates(tmp_path: Path) -> None:
    step = _sharded_step(tmp_path)
    _forge_index(step, lambda tensors: None)
    target = tmp_path / "full.safetensors"
    assert tk.checkpoint.consolidate(step, target).tensors == 2
    assert torch.equal(tk.load_state_dict(target)["model/b"], torch.ones(3))


def test_chunk_overlap_check_on_large_layouts() -> None:
    from torchkeep.checkpoint.distributed.layout import geometry_problem

    def grid() -> list[tuple[list[int], list[int]]]:
        return [([i, j], [1, 1]) for i in range(64) for j in range(64)]  # a 64 x 64 mesh

    assert geometry_problem([64, 64], grid()) is None
    assert geometry_problem([65536], [([i], [1]) for i in range(65536)]) is None
    shuffled = grid()
    shuffled[0], shuffled[-1] = shuffled[-1], shuffled[0]
    assert geometry_problem([64, 64], [*shuffled, ([5, 5], [0, 1])]) is None  # empty: no overlap
    twice = grid()
    twice[-1] = ([0, 0], [1, 1])  # 4096 elements, but one cell twice and one never
    assert geometry_problem([64, 64], twice) == "overlapping chunks 0 and 4095"


# ---- builder bundles: a hostile transformers recipe -----------------------------------------


@pytest.fixture
def hf() -> Any:
    transformers = require_transformers_with_torch()
    transformers.logging.set_verbosity_error()
    return transformers


def _m2m_config(hf: Any, **changes: Any) -> Any:
    """A tiny M2M100 (sinusoidal positions: a non-persistent buffer sized by the config)."""
    settings = dict(
        vocab_size=32, d_model=8, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=8,
        decoder_ffn_dim=8, encoder_attention_heads=1, decoder_attention_heads=1,
        max_position_embeddings=16,
    )  # fmt: skip
    return hf.M2M100Config(**{**settings, **changes})


def _forge_bundle(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite ``config.json`` with ``edit`` and re-record the manifest consistently."""
    from torchkeep.manifest import MANIFEST_NAME, FileRecord, read_manifest, write_manifest

    document = json.loads((bundle / "config.json").read_text())
    edit(document)
    (bundle / "config.json").write_text(json.dumps(document))
    manifest = read_manifest(bundle)
    files = {n: FileRecord(*hash_file(bundle / n)) for n in manifest["files"]}
    (bundle / MANIFEST_NAME).unlink()
    write_manifest(
        bundle, kind="torchkeep.bundle", files=files, format_version=manifest["format_version"]
    )


def test_a_recipe_whose_computed_buffers_dwarf_its_weights_is_refused_before_building(
    hf: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep.model import bundle as bundle_module

    bundle = tk.save_model(hf.M2M100Model(_m2m_config(hf)).eval(), tmp_path / "m2m")
    positions = 1 << 22
    _forge_bundle(
        bundle,
        lambda d: d["builder"]["spec"]["config"].update(max_position_embeddings=positions),
    )
    # the forged recipe really makes transformers compute a table far beyond the stored weights
    with torch.device("meta"):
        plain = hf.M2M100Model(_m2m_config(hf, max_position_embeddings=positions))
    computed = sum(b.numel() * b.element_size() for _, b in plain.named_buffers())
    stored = sum(
        t.numel() * t.element_size()
        for t in tk.load_state_dict(bundle / "model.safetensors").values()
    )
    assert computed > 1000 * stored

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built before the size check")

    monkeypatch.setattr(bundle_module, "build_without_init", never)
    with pytest.raises(tk.InitArgsError, match="non-persistent buffers") as info:
        tk.load_model(bundle)
    assert f"{computed:,}" in str(info.value)


def test_a_class_path_bundle_gets_the_same_computed_buffer_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep.formats import safetensors as st
    from torchkeep.model import bundle as bundle_module

    class Table(torch.nn.Module):  # an installed class that computes a table its args size
        def __init__(self, n: int) -> None:
            super().__init__()
            self.register_buffer("table", torch.zeros(n), persistent=False)
            self.w = torch.nn.Parameter(torch.zeros(2))

    tk.save_weights(Table(4), tmp_path / "w.safetensors")
    header = st.read_header(tmp_path / "w.safetensors")
    monkeypatch.setattr(bundle_module, "build_without_init", lambda _: pytest.fail("built"))
    # the recorded argument an attacker sets: float32 elements just beyond the bound in bytes
    n = (8 + bundle_module.MAX_COMPUTED_BYTES) // 4 + 1
    with pytest.raises(tk.InitArgsError, match="non-persistent buffers"):
        bundle_module._build(lambda: Table(n), "Table", torch.device("cpu"), header)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"per_layer_config": {"$dict": [[0, {"attn_implementation": "kernels-community/x"}]]}},
         "per_layer_config.0.attn_implementation"),
        ({"notes": [{"auto_map": {"AutoModel": "evil.Model"}}]}, "notes[0].auto_map"),
        ({"notes": [[{"trust_remote_code": True}]]}, "notes[0][0].trust_remote_code"),
        ({"sub": {"$dict": [[1, [{"_attn_implementation": "kernels-community/x"}]]]}},
         "sub.1[0]._attn_implementation"),
    ],
    ids=["int-keyed", "in-a-list", "list-in-list", "int-key-then-list"],
)  # fmt: skip
def test_forbidden_transformers_keys_are_refused_at_any_depth(
    extra: dict[str, Any], key: str, hf: Any, tmp_path: Path
) -> None:
    bundle = tk.save_model(hf.M2M100Model(_m2m_config(hf)).eval(), tmp_path / "m2m")
    _forge_bundle(bundle, lambda d: d["builder"]["spec"]["config"].update(extra))
    with pytest.raises(InvalidDocumentError, match="fetch or run code") as info:
        tk.load_model(bundle)
    assert repr(key) in str(info.value)
    assert not tk.verify(bundle).ok


# ---- save_pretrained folders and shard indexes ----------------------------------------------


class _Payload:
    """Pickles as a call of os.system (touches the canary when unpickled)."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.canary}",))


def _sharded_folder(tmp_path: Path, *, kind: str = "safetensors") -> Path:
    """A save_pretrained-style folder: nn.Linear(2, 2) in two shards and their index."""
    folder = tmp_path / "pretrained"
    folder.mkdir()
    layer = torch.nn.Linear(2, 2)
    stem, suffix = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")
    names = {
        key: f"{stem}-0000{i + 1}-of-00002.{suffix}" for i, key in enumerate(("weight", "bias"))
    }
    for key, name in names.items():
        if kind == "safetensors":
            tk.save_weights({key: layer.state_dict()[key]}, folder / name)
        else:
            torch.save({key: layer.state_dict()[key]}, folder / name)
    index = {"metadata": {"total_size": 24}, "weight_map": names}
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index))
    return folder


def _index_of(folder: Path) -> Path:
    return next(folder.glob("*.index.json"))


def _rewrite_map(folder: Path, **changes: str) -> None:
    index = _index_of(folder)
    document = json.loads(index.read_text())
    document["weight_map"].update(changes)
    index.write_text(json.dumps(document))


def test_a_bin_shard_carrying_a_pickle_payload_is_scanned_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = tmp_path / "canary"
    folder = _sharded_folder(tmp_path, kind="bin")
    shard = folder / "pytorch_model-00002-of-00002.bin"
    torch.save({"bias": torch.zeros(2), "x": _Payload(canary)}, shard)
    prove_live(TORCH_LOAD, canary, path=shard)
    for source in (folder, _index_of(folder)):
        with pytest.raises(tk.UnsafeCheckpointError, match=r"system"):
            tk.load_weights(torch.nn.Linear(2, 2), source)
        with pytest.raises(tk.UnsafeCheckpointError, match=r"system"):
            tk.load_state_dict(source)
        assert not canary.exists()
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(folder), str(out)]) != 0
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists()
    assert not canary.exists()


def _outside(tmp_path: Path, folder: Path) -> str:
    shutil.copy(folder / "model-00001-of-00002.safetensors", tmp_path / "secret.safetensors")
    return "../secret.safetensors"


def _absolute(tmp_path: Path, folder: Path) -> str:
    _outside(tmp_path, folder)
    return str(tmp_path / "secret.safetensors")


def _in_a_subfolder(tmp_path: Path, folder: Path) -> str:
    (folder / "sub").mkdir()
    shutil.copy(folder / "model-00001-of-00002.safetensors", folder / "sub" / "w.safetensors")
    return "sub/w.safetensors"


def _hidden(tmp_path: Path, folder: Path) -> str:
    shutil.copy(folder / "model-00001-of-00002.safetensors", folder / ".w.safetensors")
    return ".w.safetensors"


@pytest.mark.parametrize(
    "place", [_outside, _absolute, _in_a_subfolder, _hidden], ids=lambda f: f.__name__[1:]
)
def test_a_shard_named_outside_the_index_folder_is_refused_by_the_schema(
    place: Callable[[Path, Path], str], tmp_path: Path
) -> None:
    folder = _sharded_folder(tmp_path)
    _rewrite_map(folder, weight=place(tmp_path, folder))
    with pytest.raises(InvalidDocumentError, match=r"weight_map\['weight'\]"):
        tk.load_weights(torch.nn.Linear(2, 2), folder)


def test_a_shard_linked_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    folder = _sharded_folder(tmp_path)
    shard = folder / "model-00001-of-00002.safetensors"
    shard.rename(tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(tk.UnsafeCheckpointError, match="outside"):
        tk.load_weights(torch.nn.Linear(2, 2), folder)
    # a link that stays inside the folder is fine
    (tmp_path / "elsewhere.safetensors").rename(folder / "real.safetensors")
    shard.unlink()
    shard.symlink_to(folder / "real.safetensors")
    _rewrite_map(folder)  # unchanged map: the link's name is what the index names
    assert tk.load_weights(torch.nn.Linear(2, 2), folder).ok


def test_the_folder_weights_file_linked_out_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pretrained"
    folder.mkdir()
    tk.save_weights(torch.nn.Linear(2, 2), tmp_path / "outside.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(tk.UnsafeCheckpointError, match="outside"):
        tk.load_weights(torch.nn.Linear(2, 2), folder)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ('{"weight_map": {"weight": "a.safetensors", "weight": "b.safetensors"}}',
         "repeats the key"),
        ('{"weight_map": {"weight": "model.safetensors.index.json",'
         ' "bias": "model-00002-of-00002.safetensors"}}', "not safetensors"),
        ('{"weight_map": {"weight": "model-00002-of-00002.safetensors",'
         ' "bias": "model-00002-of-00002.safetensors"}}', "no shard holds it"),
        ('{"weight_map": {"weight": "model-00001-of-00002.safetensors",'
         ' "bias": "model-00002-of-00002.safetensors",'
         ' "ghost": "model-00002-of-00002.safetensors"}}',
         "no shard holds it"),
        ('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}", "deeper than"),
        ('{"weight_map": {"weight": ".."}}', r"weight_map\['weight'\]"),
    ],
    ids=["duplicate-key", "index-as-shard", "wrong-shard", "ghost", "deep", "dotdot"],
)  # fmt: skip
def test_an_index_that_disagrees_with_its_shards_is_refused_before_reading_tensors(
    document: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep.formats import safetensors as st

    folder = _sharded_folder(tmp_path)
    _index_of(folder).write_text(document)
    monkeypatch.setattr(st, "read_into", lambda *a, **k: pytest.fail("tensors were read"))
    with pytest.raises(tk.CorruptFileError, match=message):
        tk.load_weights(torch.nn.Linear(2, 2), folder)


def test_a_shard_that_is_a_torch_file_holding_a_whole_model_is_refused(tmp_path: Path) -> None:
    # a shard must be a state dict: a pickled module is not unpickled to find one
    folder = _sharded_folder(tmp_path, kind="bin")
    torch.save(torch.nn.Linear(2, 2), folder / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(tk.UnsafeCheckpointError):
        tk.load_weights(torch.nn.Linear(2, 2), folder)


# ---- sealed trainer folders: last_valid_checkpoint on a hostile output_dir -------------------


@pytest.fixture
def hf_integration(hf: Any) -> Any:
    from torchkeep.integrations import transformers as integration

    return integration


def _sealed_run(tmp_path: Path) -> tuple[Path, Path]:
    """An output_dir with a sealed checkpoint-5 (a file and a sealed sub-folder)."""
    from torchkeep.integrations import _seal

    checkpoint = tmp_path / "out" / "checkpoint-5"
    (checkpoint / "sub").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "sub" / "part.bin").write_bytes(b"ok")
    _seal.seal(checkpoint)
    return tmp_path / "out", checkpoint


def test_a_sealed_subfolder_that_is_a_link_out_is_refused(
    hf_integration: Any, tmp_path: Path
) -> None:
    from torchkeep.integrations import _seal

    output_dir, checkpoint = _sealed_run(tmp_path)
    assert hf_integration.last_valid_checkpoint(output_dir) == str(checkpoint)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part.bin").write_bytes(b"anything")
    _seal.seal(foreign)  # complete and valid on its own
    shutil.rmtree(checkpoint / "sub")
    (checkpoint / "sub").symlink_to(foreign)
    with pytest.warns(UserWarning, match="is a link or not a folder"):
        assert hf_integration.last_valid_checkpoint(output_dir) is None


def test_sealed_subfolders_linking_back_end_at_once(hf_integration: Any, tmp_path: Path) -> None:
    _, checkpoint = _sealed_run(tmp_path)
    shutil.rmtree(checkpoint / "sub")
    (checkpoint / "sub").symlink_to(checkpoint)  # followed blindly: 40 levels, then ELOOP
    problems = hf_integration.checkpoint_problems(checkpoint)
    assert problems == [
        f"{checkpoint / 'sub'} is listed as a sealed folder but is a link or not a folder"
    ]


def test_sealed_folders_nested_beyond_the_bound_are_refused(
    hf_integration: Any, tmp_path: Path
) -> None:
    from torchkeep.integrations import _seal

    checkpoint = tmp_path / "out" / "checkpoint-1"
    deep = checkpoint.joinpath(*["d"] * (_seal.MAX_DEPTH + 1))
    deep.mkdir(parents=True)
    (deep / "x.bin").write_bytes(b"x")
    _seal.seal(checkpoint)
    assert any("folders deep" in p for p in hf_integration.checkpoint_problems(checkpoint))


def test_a_checkpoint_folder_that_is_a_link_is_not_resumed_from(
    hf_integration: Any, tmp_path: Path
) -> None:
    output_dir, checkpoint = _sealed_run(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "checkpoint-9"
    elsewhere.parent.mkdir()
    shutil.copytree(checkpoint, elsewhere, symlinks=True)
    (output_dir / "checkpoint-9").symlink_to(elsewhere)
    with pytest.warns(UserWarning, match="checkpoint-9 is a link"):
        assert hf_integration.last_valid_checkpoint(output_dir) == str(checkpoint)


@pytest.mark.parametrize("name", ["../secret.bin", "/etc/hostname", "sub/part.bin", ".hidden"])
def test_a_sealed_manifest_listing_files_outside_the_folder_is_refused(
    name: str, hf_integration: Any, tmp_path: Path
) -> None:
    output_dir, checkpoint = _sealed_run(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"s")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"size": 1, "hash": "0" * 32}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    problems = hf_integration.checkpoint_problems(checkpoint)
    assert any("is not a valid document" in p and "files" in p for p in problems), problems
    with pytest.warns(UserWarning, match="incomplete"):
        assert hf_integration.last_valid_checkpoint(output_dir) is None


# ---- Lightning: a hostile .ckpt given to the plugin or to convert_ckpt -----------------------


@pytest.fixture
def lightning_io() -> Any:
    pytest.importorskip("lightning")
    from torchkeep.integrations import lightning as integration

    return integration


def _hostile_ckpt(tmp_path: Path) -> tuple[Path, Path]:
    canary = tmp_path / "canary"
    ckpt = tmp_path / "epoch=1.ckpt"
    layer = torch.nn.Linear(2, 2)
    torch.save(
        {"state_dict": layer.state_dict(), "epoch": 1, "hyper_parameters": {"x": _Payload(canary)}},
        ckpt,
    )
    prove_live(TORCH_LOAD, canary, path=ckpt)
    return ckpt, canary


def test_convert_of_a_hostile_lightning_ckpt_is_refused_by_the_scan(
    lightning_io: Any, tmp_path: Path
) -> None:
    ckpt, canary = _hostile_ckpt(tmp_path)
    with pytest.raises(tk.UnsafeCheckpointError, match="system"):
        lightning_io.convert_ckpt(ckpt, tmp_path / "new.ckpt")
    assert not canary.exists()
    assert not (tmp_path / "new.ckpt").exists()


def test_the_plugin_never_unpickles_a_ckpt_file(lightning_io: Any, tmp_path: Path) -> None:
    ckpt, canary = _hostile_ckpt(tmp_path)
    plugin = lightning_io.TorchkeepCheckpointIO()
    with pytest.raises(tk.FileFormatError, match="convert_ckpt"):
        plugin.load_checkpoint(ckpt, weights_only=False)
    with pytest.raises(tk.FileFormatError, match="convert_ckpt"):
        lightning_io.load_from_checkpoint(torch.nn.Module, ckpt)
    assert not canary.exists()


# ---- programs whose outputs are registered pytree types ----------------------------------------

_PROGRAM_CHILD = """
import torchkeep as tk
try:
    tk.load_model({path!r}, trust_program=True)
except tk.ModelClassNotFoundError as exc:
    print("REFUSED", exc)
import sys
print("IMPORTED" if "rt2evil" in sys.modules else "NOT-IMPORTED")
"""


def test_a_program_output_type_naming_importable_code_is_never_imported(tmp_path: Path) -> None:
    skip_unless_programs_load()
    import subprocess
    import sys
    import zipfile

    class Out(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"a": x + 1}

    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(Out(), (torch.ones(2),)), str(clean))
    program = tmp_path / "program.pt2"
    with zipfile.ZipFile(clean) as source, zipfile.ZipFile(program, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("models/model.json"):
                data = data.replace(b'\\"builtins.dict\\"', b'\\"rt2evil.Out\\"')
                assert b"rt2evil.Out" in data
            target.writestr(info, data)
    canary = tmp_path / "canary"
    (tmp_path / "rt2evil.py").write_text(f"open({str(canary)!r}, 'w').close()\nclass Out: pass\n")
    prove_live("import rt2evil", canary, cwd=tmp_path)  # importing the named module runs code
    src = Path(tk.__file__).resolve().parents[1]
    child = subprocess.run(
        [sys.executable, "-c", _PROGRAM_CHILD.format(path=str(program))],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "REFUSED" in child.stdout, child.stdout + child.stderr
    assert "rt2evil.Out" in child.stdout
    assert "not registered" in child.stdout
    assert "NOT-IMPORTED" in child.stdout
    assert not canary.exists()
