"""Hypothesis strategies for hostile inputs: file bytes with recognisable magic, mutated documents.

Shared by ``test_fuzz_public.py`` (the library's public functions) and ``test_fuzz_cli.py`` (every
CLI command). Files start from real samples of every format torchkeep reads (a safetensors
file, a ``torch.save`` zip, a pickle, an ONNX model) and are then cut, overwritten or given a
random body behind a genuine magic prefix, so the fuzzer reaches past the first format check.
Directories start from a real bundle or checkpoint whose JSON documents (``manifest.json``,
``config.json``, ``state.json``) get one field replaced by a hostile JSON value, and the
manifest's hash of the changed file is recomputed, so the change gets past the hash gate and
reaches the document's validation.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

import torchkeep as tk
from torchkeep.formats import LEGACY_TORCH_PREFIX
from torchkeep.hashing import hash_file
from torchkeep.models import Net

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".onnx", ".pt2", ".ckpt", "")


def _safetensors_sample() -> bytes:
    buffer = io.BytesIO()
    from safetensors.torch import save

    buffer.write(save({"w": torch.arange(4.0), "b": torch.zeros(2, dtype=torch.int64)}))
    return buffer.getvalue()


def _torch_zip_sample() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4.0), "step": 3}, buffer)
    return buffer.getvalue()


def _onnx_sample() -> bytes:
    """A small ONNX model with a stored report (empty when onnx is not installed: torchkeep then
    refuses ``.onnx`` files with ``MissingDependencyError``, which the fuzzing still covers)."""
    try:
        import onnx
    except ImportError:
        return b""

    helper = onnx.helper
    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [2], [1.0, 2.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="torchkeep.report", value='{"opset": 17, "rtol": 0.001}')
    return bytes(model.SerializeToString())


SAMPLES = {
    "safetensors": _safetensors_sample(),
    "torch-zip": _torch_zip_sample(),
    "pickle": pickle.dumps({"w": [1.0, 2.0], "step": 3}, protocol=2),
}
if onnx_bytes := _onnx_sample():
    SAMPLES["onnx"] = onnx_bytes

PREFIXES = (
    b"PK\x03\x04",  # zip: torch.save, torch.export
    b"\x80\x02",  # pickle protocol 2
    b"\x80\x04\x95",  # pickle protocol 4 frame
    LEGACY_TORCH_PREFIX,
    b"\x08\x07\x12",  # ONNX: ir_version 7, then a string field
    b"{",
    b"",
)


@st.composite
def _mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` cut short, with bytes overwritten, or with bytes inserted."""
    position = draw(st.integers(0, len(data)))
    how = draw(st.sampled_from(["truncate", "overwrite", "insert"]))
    if how == "truncate":
        return data[:position]
    patch = draw(st.binary(min_size=1, max_size=8))
    end = position + len(patch) if how == "overwrite" else position
    return data[:position] + patch + data[end:]


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**64, -(2**63) - 1, 10**300, float("nan"), float("inf"), -0.0, 1e308])
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["", "../x", "/etc/passwd", "torchkeep.bundle", "os.system", "\x00", "٣"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
"""Any JSON value (NaN and infinities included, as Python's json writes them), hostile leaning."""


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> bytes:
    """A safetensors-shaped file: an 8-byte length, a header with one field edited, a body."""
    header = {
        "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "__metadata__": {"format": "pt"},
    }
    text = json.dumps(draw(document_edit(header))).encode()
    length = draw(st.sampled_from([len(text), 0, 7, 2**63, 2**64 - 1, len(text) + 1]))
    return struct.pack("<Q", length) + text + draw(st.binary(max_size=32))


file_bytes: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=256),
    st.builds(lambda p, b: p + b, st.sampled_from(PREFIXES), st.binary(max_size=256)),
    st.sampled_from(list(SAMPLES.values())).flatmap(_mutated),
    safetensors_bytes(),
)
"""Hostile file contents."""


def write_file(folder: Path, suffix: str, data: bytes) -> Path:
    """Write ``data`` to ``folder/input<suffix>`` and return the path."""
    path = folder / f"input{suffix}"
    path.write_bytes(data)
    return path


# ---- directories: a real bundle or checkpoint with one document field replaced ----------------


def make_bundle(folder: Path) -> Path:
    """A small bundle (no program) of the tutorial's Net."""
    torch.manual_seed(0)
    return tk.save_model(Net(), folder / "net.bundle")


def make_checkpoint(folder: Path) -> Path:
    """A checkpoint folder with two steps of Net and its SGD optimizer."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    manager = tk.CheckpointManager(folder / "ckpt", keep_last=3)
    for step in (1, 2):
        manager.save(
            step, model=model, optimizer=optimizer, metrics={"loss": 1.0 / step}, epoch=step
        )
    manager.wait()
    return folder / "ckpt"


def _replace_at(document: Any, path: list[Any], value: Any, delete: bool) -> Any:
    if not path:
        return value
    head, *rest = path
    if rest or not delete:
        document[head] = _replace_at(document[head], rest, value, delete)
    elif isinstance(document, dict):
        del document[head]
    else:
        document.pop(head)
    return document


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into ``document`` (the root included)."""
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def document_edit(draw: st.DrawFn, document: Any) -> Any:
    """``document`` with one field (at any depth) replaced by a hostile value or deleted."""
    path = list(draw(st.sampled_from(_paths(document))))
    value = draw(json_values)
    delete = bool(path) and draw(st.booleans())
    return _replace_at(json.loads(json.dumps(document)), path, value, delete)


def rehash(manifest_dir: Path, name: str) -> None:
    """Record ``name``'s current size and hash in ``manifest_dir/manifest.json`` (if listed)."""
    manifest_path = manifest_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if name in manifest.get("files", {}):
        size, digest = hash_file(manifest_dir / name)
        manifest["files"][name] = {"hash": digest, "size": size}
        manifest_path.write_text(json.dumps(manifest))


def mutate_directory(draw: st.DrawFn, root: Path, documents: list[Path]) -> Path:
    """Edit one of ``documents`` (JSON files under ``root``), rehash it, and return ``root``."""
    target = draw(st.sampled_from(documents))
    edited = draw(document_edit(json.loads(target.read_text())))
    target.write_text(json.dumps(edited))
    if target.name != "manifest.json":
        rehash(target.parent, target.name)
    return root


def copy_tree(source: Path, folder: Path) -> Path:
    """Copy the directory ``source`` into ``folder``; return the copy."""
    return Path(shutil.copytree(source, folder / source.name, symlinks=True))


KINDS = ("file", "bundle", "checkpoint", "step")


@st.composite
def hostile_path(
    draw: st.DrawFn, folder: Path, bundle: Path, checkpoint: Path, kinds: tuple[str, ...] = KINDS
) -> Path:
    """A hostile input under ``folder``: a file, or a mutated bundle, checkpoint or step."""
    kind = draw(st.sampled_from(kinds))
    if kind == "file":
        return write_file(folder, draw(st.sampled_from(SUFFIXES)), draw(file_bytes))
    if kind == "bundle":
        root = copy_tree(bundle, folder)
        return mutate_directory(draw, root, [root / "manifest.json", root / "config.json"])
    root = copy_tree(checkpoint, folder)
    step = sorted(root.glob("step-*"))[-1]
    mutate_directory(draw, root, [step / "manifest.json", step / "state.json"])
    return step if kind == "step" else root
