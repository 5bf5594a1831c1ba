"""``inspect`` support for bundles, ``.pt2`` programs and TorchScript archives (never loaded)."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

from ..describe import DESCRIBERS, Description, TensorInfo, describe
from ..formats import Format
from ..manifest import files_folder, read_manifest
from ..schema import Limits, parse_json_document
from ..security.members import MemberReader
from ..security.policy import LIMITS
from .config import read_config
from .layout import BUNDLE_KIND, PROGRAM_NAME, WEIGHTS_NAME, content_problems

_PROGRAM_NOTE = (
    "a torch.export program: it runs without the model's Python code. torch.export.load can "
    "execute code from the file (it unpickles parts of it), so torchkeep loads it only with "
    "load_model(..., trust_program=True), after a scan"
)


def _describe_bundle(path: Path) -> Description:
    manifest = read_manifest(path, kind=BUNDLE_KIND)
    folder = files_folder(path, manifest)
    description = describe(folder / WEIGHTS_NAME)
    description.path, description.format = path, Format.BUNDLE
    description.size = sum(int(r.get("size", 0)) for r in manifest["files"].values())
    config = read_config(folder)
    description.sections["bundle"] = [
        ("class", config.class_path),
        ("init args", json.dumps(config.init, sort_keys=True)),
        ("program", "yes (program.pt2)" if (folder / PROGRAM_NAME).is_file() else "no"),
        ("files", ", ".join(sorted(manifest["files"]))),
        ("saved with", f"torchkeep {manifest.get('torchkeep_version')}, "
                       f"torch {manifest.get('torch_version')}"),
    ]  # fmt: skip
    description.notes.append(
        "load with tk.load_model(path); it imports the class above (your installed code)"
    )
    description.notes.extend(
        f"unsafe: {problem} (load_model refuses this bundle)"
        for problem in content_problems(path, manifest)
    )
    if (folder / PROGRAM_NAME).is_file():
        description.notes.append(f"program.pt2 is {_PROGRAM_NOTE}")
    return description


def _dtype_name(code: object) -> str:
    from torch._export.serde.schema import ScalarType

    try:
        return ScalarType(int(str(code))).name.lower()
    except ValueError:
        return f"scalar type {code}"


def _program_tensors(path: Path, archive: zipfile.ZipFile) -> list[TensorInfo]:
    """Tensors the program's weights configs declare, read bounded (the archive is untrusted:
    each config is streamed through the scanner's member reader, so a deflated config is no
    zip bomb, and parsed within the JSON document limits; values of odd types are skipped)."""
    reader = MemberReader(path)
    tensors = []
    for info in archive.infolist():
        if not info.filename.endswith("_weights_config.json"):
            continue
        with reader.open(archive, info, f"{path}!{info.filename}", LIMITS.max_document) as f:
            data = f.read(LIMITS.max_document + 1)
        document = parse_json_document(
            data,
            source=f"{path}!{info.filename}",
            limits=Limits(max_bytes=LIMITS.max_document),
            fix="re-export the program with torch.export.save",
        )
        config = document.get("config") if isinstance(document, dict) else None
        for fqn, entry in config.items() if isinstance(config, dict) else ():
            meta = entry.get("tensor_meta") if isinstance(entry, dict) else None
            meta = meta if isinstance(meta, dict) else {}
            sizes = meta.get("sizes")
            shape = tuple(
                s["as_int"] if isinstance(s, dict) and type(s.get("as_int")) is int else 0
                for s in (sizes if isinstance(sizes, list) else ())
            )
            dtype = _dtype_name(meta.get("dtype"))
            size = {"double": 8, "long": 8, "half": 2, "bfloat16": 2, "bool": 1, "byte": 1}
            tensors.append(TensorInfo(fqn, dtype, shape, math.prod(shape) * size.get(dtype, 4)))
    return tensors


def _describe_program(path: Path) -> Description:
    description = Description(path, Format.PT2, path.stat().st_size)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        description.tensors = _program_tensors(path, archive)
    models = sorted(n.rsplit("/", 1)[1][:-5] for n in names if "/models/" in f"/{n}")
    description.sections["program"] = [
        ("programs", ", ".join(models) or "none"),
        ("archive members", str(len(names))),
        ("native code (AOTInductor)", "yes" if any("aotinductor/" in n for n in names) else "no"),
    ]
    description.notes.append(f"{path.name} is {_PROGRAM_NOTE}")
    return description


def _describe_torchscript(path: Path) -> Description:
    description = Description(path, Format.TORCHSCRIPT, path.stat().st_size)
    with zipfile.ZipFile(path) as archive:
        code = sorted(n for n in archive.namelist() if "/code/" in f"/{n}" and n.endswith(".py"))
    description.sections["torchscript"] = [("code files", ", ".join(code) or "none")]
    description.notes.append(
        "a TorchScript archive (torch.jit.save). TorchScript is deprecated upstream; torchkeep "
        "does not load it, because torch.jit.load runs the code inside. `torchkeep scan` lists "
        "what it imports; if you trust it, load it yourself and save a bundle with tk.save_model"
    )
    return description


DESCRIBERS[Format.BUNDLE] = _describe_bundle
DESCRIBERS[Format.PT2] = _describe_program
DESCRIBERS[Format.TORCHSCRIPT] = _describe_torchscript
