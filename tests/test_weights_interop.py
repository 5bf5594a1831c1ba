"""Weights other tools wrote: save_pretrained folders, tied HF files, sharded (hostile) indexes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.pretrained import INDEX_LIMITS

from ._live import TORCH_LOAD, prove_live
from .conftest import assert_state_equal

transformers = pytest.importorskip("transformers")
# transformers 5 disables its torch models under torch < 2.6 (tests/_compat.py)
pytestmark = pytest.mark.usefixtures("transformers_models")


def _gpt2(seed: int, *, tied: bool = True) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=16,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model: nn.Module = transformers.GPT2LMHeadModel(config)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A tied GPT-2 and a folder with its save_pretrained output: whole, and sharded."""
    root = tmp_path_factory.mktemp("pretrained")
    model = _gpt2(0)
    model.save_pretrained(root / "whole")
    model.save_pretrained(root / "sharded", max_shard_size="8KB")
    return model, root


def test_save_pretrained_drops_the_tied_key(saved: tuple[nn.Module, Path]) -> None:
    """The premise: the HF file lacks lm_head.weight, and the model really ties it."""
    model, root = saved
    assert "lm_head.weight" not in tk.load_state_dict(root / "whole" / "model.safetensors")
    assert model.lm_head.weight is model.transformer.wte.weight
    shards = sorted(p.name for p in (root / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2


@pytest.mark.parametrize(
    "where", ["whole", "whole/model.safetensors", "sharded", "sharded/model.safetensors.index.json"]
)
def test_strict_load_of_save_pretrained_output(saved: tuple[nn.Module, Path], where: str) -> None:
    model, root = saved
    target = _gpt2(1)
    report = tk.load_weights(target, root / where)  # strict
    assert report.ok
    assert report.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in report.loaded
    assert any("tied" in note for note in report.notes)
    assert_state_equal(target.state_dict(), model.state_dict())
    assert target.lm_head.weight is target.transformer.wte.weight
    tokens = torch.randint(0, 64, (2, 5))
    assert torch.equal(target.eval()(tokens).logits, model.eval()(tokens).logits)
    assert_state_equal(
        tk.load_state_dict(root / where), tk.load_state_dict(root / "whole/model.safetensors")
    )


def test_a_tie_is_taken_from_the_model_never_the_file(saved: tuple[nn.Module, Path]) -> None:
    """An untied model needs its own lm_head.weight: the same file is refused in strict mode."""
    _, root = saved
    untied = _gpt2(1, tied=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    before = untied.lm_head.weight.detach().clone()
    with pytest.raises(tk.StateDictMismatchError, match=r"lm_head\.weight"):
        tk.load_weights(untied, root / "whole")
    report = tk.load_weights(untied, root / "whole", strict=False)
    assert report.missing == ["lm_head.weight"]
    assert not report.tied
    assert torch.equal(untied.lm_head.weight, before)


def test_a_declared_tie_missing_in_memory_stays_missing(saved: tuple[nn.Module, Path]) -> None:
    _, root = saved
    model = _gpt2(1)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    report = tk.load_weights(model, root / "whole", strict=False)
    assert report.missing == ["lm_head.weight"]
    assert any("tie_weights()" in note for note in report.notes)


def _write_bin_shards(folder: Path, state: dict[str, torch.Tensor], per_shard: int) -> None:
    """A ``pytorch_model.bin.index.json`` folder, laid out as transformers writes one."""
    folder.mkdir()
    keys = list(state)
    chunks = [keys[i : i + per_shard] for i in range(0, len(keys), per_shard)]
    weight_map = {}
    for number, chunk in enumerate(chunks, 1):
        name = f"pytorch_model-{number:05d}-of-{len(chunks):05d}.bin"
        torch.save({k: state[k].clone() for k in chunk}, folder / name)
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_strict_load_of_a_bin_shard_index(saved: tuple[nn.Module, Path], tmp_path: Path) -> None:
    model, _ = saved
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _write_bin_shards(tmp_path / "bin", state, per_shard=5)
    target = _gpt2(1)
    report = tk.load_weights(target, tmp_path / "bin")
    assert report.ok
    assert report.format == tk.formats.Format.TORCH_ZIP
    assert report.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert_state_equal(target.state_dict(), model.state_dict())


# --------------------------------------------------------------------------------------------
# hostile indexes


def _small_index(folder: Path) -> tuple[dict[str, Any], Path]:
    """A valid two-shard safetensors index of a tiny state."""
    folder.mkdir()
    tk.save_weights({"a": torch.ones(2)}, folder / "s1.safetensors")
    tk.save_weights({"b": torch.zeros(3)}, folder / "s2.safetensors")
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    return index, path


def test_the_small_index_loads(tmp_path: Path) -> None:
    _, path = _small_index(tmp_path / "m")
    state = tk.load_state_dict(path.parent)
    assert torch.equal(state["a"], torch.ones(2))
    assert torch.equal(state["b"], torch.zeros(3))


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"a": "s1.safetensors", "b": "s1.safetensors"}, tk.CorruptFileError, "'b' in s1"),
        ({"a": "s2.safetensors", "b": "s2.safetensors"}, tk.CorruptFileError, "'a' in s2"),
        ({"a": "s1.safetensors", "b": "nope.safetensors"}, tk.FileFormatError, "nope"),
        ({"a": 3, "b": "s2.safetensors"}, tk.InvalidDocumentError, r"weight_map\['a'\]"),
        (
            {"a": "model.safetensors.index.json", "b": "s2.safetensors"},
            tk.CorruptFileError,
            "not safetensors",
        ),
    ],
    ids=["key-not-in-shard", "wrong-shard", "missing-shard", "not-a-name", "self"],
)
def test_an_inconsistent_index_names_the_file_and_key(
    tmp_path: Path, change: dict[str, Any], error: type[Exception], words: str
) -> None:
    _index, path = _small_index(tmp_path / "m")
    path.write_text(json.dumps({"weight_map": change}))
    target = nn.ParameterDict({"a": torch.zeros(2), "b": torch.ones(3)})
    with pytest.raises(error, match=words) as info:
        tk.load_weights(target, path.parent)
    assert str(path.parent) in str(info.value)
    assert torch.equal(target["a"], torch.zeros(2))  # nothing changed


def test_a_key_in_two_shards_is_refused(tmp_path: Path) -> None:
    _, path = _small_index(tmp_path / "m")
    tk.save_weights({"a": torch.ones(2), "b": torch.zeros(3)}, path.parent / "s2.safetensors")
    with pytest.raises(tk.CorruptFileError, match=r"'a' is held by two shards, s1\.safetensors"):
        tk.load_state_dict(path)


def test_a_shard_holding_an_unmapped_key_is_refused(tmp_path: Path) -> None:
    _, path = _small_index(tmp_path / "m")
    tk.save_weights({"b": torch.zeros(3), "c": torch.ones(1)}, path.parent / "s2.safetensors")
    with pytest.raises(tk.CorruptFileError, match=r"s2\.safetensors holds tensor 'c'"):
        tk.load_state_dict(path)


def test_a_huge_or_deep_index_is_refused_before_parsing(tmp_path: Path) -> None:
    _, path = _small_index(tmp_path / "m")
    with open(path, "r+b") as f:
        f.truncate(INDEX_LIMITS.max_bytes + 1)  # sparse: nothing is written, nothing read
    with pytest.raises(tk.InvalidDocumentError, match="bytes"):
        tk.load_state_dict(path.parent)
    path.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(tk.InvalidDocumentError, match="deeper"):
        tk.load_state_dict(path.parent)


class _WritesCanary:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"echo pwned > {self.canary}",))


def _evil_bin(path: Path, canary: Path) -> None:
    torch.save({"b": torch.zeros(3), "x": _WritesCanary(canary)}, path)


@pytest.mark.parametrize("escape", ["parent", "absolute", "link-out"])
def test_a_shard_outside_the_folder_is_refused(tmp_path: Path, escape: str) -> None:
    """A shard path that leaves the index's folder is refused before anything reads it, even
    when what lies there is a live pickle payload."""
    _, path = _small_index(tmp_path / "m")
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.bin"
    _evil_bin(evil, canary)
    shard = {"parent": "../evil.bin", "absolute": str(evil), "link-out": "s2.bin"}[escape]
    if escape == "link-out":
        (path.parent / "s2.bin").symlink_to(evil)
    prove_live(TORCH_LOAD, canary, path=path.parent / shard)  # what a naive join would load
    path.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": shard}}))
    expected = tk.UnsafeCheckpointError if escape == "link-out" else tk.InvalidDocumentError
    words = r"is a link to .*, outside" if escape == "link-out" else r"weight_map\['b'\]"
    with pytest.raises(expected, match=words):
        tk.load_state_dict(path.parent)
    assert not canary.exists()


def test_a_harmless_shard_linked_from_outside_is_refused_too(tmp_path: Path) -> None:
    """The link check is its own gate: a link out to a valid safetensors shard is refused."""
    _, path = _small_index(tmp_path / "m")
    tk.save_weights({"b": torch.zeros(3)}, tmp_path / "elsewhere.safetensors")
    (path.parent / "s2.safetensors").unlink()
    (path.parent / "s2.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(tk.UnsafeCheckpointError, match=r"is a link to .*, outside"):
        tk.load_state_dict(path.parent)
    (path.parent / "s2.safetensors").unlink()
    (path.parent / "s2.safetensors").symlink_to("s1.safetensors")  # a link inside is fine
    tk.save_weights({"b": torch.zeros(3)}, path.parent / "s1.safetensors")
    path.write_text(json.dumps({"weight_map": {"b": "s2.safetensors"}}))
    assert torch.equal(tk.load_state_dict(path.parent)["b"], torch.zeros(3))


def test_a_pickle_payload_in_a_bin_shard_is_refused_by_the_scan(tmp_path: Path) -> None:
    _, path = _small_index(tmp_path / "m")
    canary = tmp_path / "canary"
    _evil_bin(path.parent / "s2.bin", canary)
    prove_live(TORCH_LOAD, canary, path=path.parent / "s2.bin")
    path.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.bin"}}))
    with pytest.raises(tk.UnsafeCheckpointError, match="could run") as info:
        tk.load_state_dict(path.parent)
    assert "s2.bin" in str(info.value)
    assert not canary.exists()
