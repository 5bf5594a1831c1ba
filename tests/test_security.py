"""The static pickle scanner against a generated corpus of hostile files, and guarded loading.

Every corpus file is first proven live: a plain loader (``pickle.load``, ``torch.load(
weights_only=False)``, ``torch.export.load``) run in a child process fires its payload. Then each
torchkeep loader must refuse it *with torchkeep's own gate*: the tests run with ``torch.load``
made permissive (``weights_only=False``), so a refusal cannot come from torch's weights-only
unpickler, and a loader whose scan were switched off would run the payload in this process.
"""

from __future__ import annotations

import copyreg
import io
import json
import os
import pickle
import re
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests._compat import skip_unless_programs_load
from tests._live import EXPORT_LOAD, PICKLE_LOAD, TORCH_LOAD, prove_live
from tests.conftest import assert_state_equal
from torchkeep import compat
from torchkeep.cli import main
from torchkeep.formats import Format, detect_format
from torchkeep.hashing import hash_file
from torchkeep.manifest import MANIFEST_NAME, FileRecord, read_manifest, write_manifest
from torchkeep.models import Net
from torchkeep.security import Severity

LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
EXTENSION_CODE = 1  # the copyreg code ``p2_ext1.pkl`` uses; a process that registered it is hit
REGISTER_EXTENSION = f"import copyreg\ncopyreg.add_extension('os', 'system', {EXTENSION_CODE})\n"
# Plain loaders beyond tests/_live.py's: a file object (torch.load routes a ``.safetensors``
# *path* to safetensors), and an application that reads two pickles from one stream.
TORCH_LOAD_FILE = (
    "import torch\nwith open({path}, 'rb') as f:\n    torch.load(f, weights_only=False)"
)
PICKLE_LOAD_TWICE = (
    "import pickle\nwith open({path}, 'rb') as f:\n    pickle.load(f)\n    pickle.load(f)"
)

# The messages of torchkeep's gates (a refusal must carry one of them, not torch's wording).
SCAN_GATE = "contains pickled code that could run on loading"  # formats.torch_zip
PICKLED_MODEL_GATE = "was refused: loading it would import or call"  # security.legacy
PROGRAM_GATE = "was refused even with trust_program=True"  # model.program
PROGRAM_NEEDS_TRUST = "pass trust_program=True"  # model.bundle, untrusted .pt2
NOT_A_BUNDLE = "is a file, not a model bundle"  # model.bundle
NOT_WEIGHTS = "it is a torch.export program"  # weights.open_source
UNKNOWN_FORMAT = "neither safetensors nor a torch.save file"  # weights.open_source


def _u(text: str) -> bytes:
    """BINUNICODE (protocol 1+)."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _su(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4+)."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _torch_zip_members() -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save(Net().state_dict(), buffer)
    with zipfile.ZipFile(buffer) as original:
        return {n: original.read(n) for n in original.namelist()}


def _write_zip(path: Path, members: dict[str, bytes], deflate: tuple[str, ...] = ()) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            method = zipfile.ZIP_DEFLATED if member.endswith(deflate) else zipfile.ZIP_STORED
            archive.writestr(member, data, compress_type=method)


class Corpus:
    """Hostile files whose payload creates ``canary`` when the plain loader named for it runs."""

    def __init__(self, root: Path, program: Path) -> None:
        self.root = root
        self.canary = root / "CANARY"
        self.program = program
        cmd = f"touch {self.canary}"
        self.code = f"open({str(self.canary)!r}, 'w').close()"
        self.system0 = f"cos\nsystem\n(S'{cmd}'\ntR.".encode()
        self.exec2 = b"\x80\x02cbuiltins\nexec\n" + _u(self.code) + b"\x85R."
        self.files: dict[str, Path] = {}
        self.plain: dict[str, str] = {}  # name -> the plain loader that fires its payload
        self._proven: set[str] = set()

    def raw(self, name: str, data: bytes, plain: str = PICKLE_LOAD) -> None:
        self.files[name] = self.root / name
        self.files[name].write_bytes(data)
        self.plain[name] = plain

    def torch_zip(
        self,
        name: str,
        edit: Callable[[dict[str, bytes]], dict[str, bytes]],
        *,
        deflate: tuple[str, ...] = (),
        plain: str = TORCH_LOAD,
    ) -> None:
        self.files[name] = self.root / name
        self.plain[name] = plain
        _write_zip(self.files[name], edit(_torch_zip_members()), deflate)

    def prove(self, name: str) -> None:
        """Prove ``name`` live under its plain loader (once per test session)."""
        if name not in self._proven:
            prove_live(self.plain[name], self.canary, path=self.files[name])
            self._proven.add(name)

    def build(self) -> dict[str, Path]:
        cmd = _u(f"touch {self.canary}")
        exec2 = self.exec2
        self.raw("p0_global_reduce.pkl", self.system0)
        self.raw("p1_posix_binunicode.pkl", b"cposix\nsystem\n(" + cmd + b"tR.")
        self.raw("p2_builtins_exec.pkl", exec2)
        self.raw(  # protocol < 3 maps the Python 2 module name __builtin__ to builtins
            "p2_py2_builtin_eval.pkl",
            b"\x80\x02c__builtin__\neval\n" + _u(f"__import__('os').system('touch {self.canary}')")
            + b"\x85R.",
        )  # fmt: skip
        self.raw(
            "p4_stack_global_memoize.pkl",
            b"\x80\x04" + _su("os") + b"\x94" + _su("system") + b"\x94\x93\x94" + cmd + b"\x85R.",
        )
        self.raw(  # names stored in the memo, popped, then fetched back with BINGET
            "p5_stack_global_from_memo.pkl",
            b"\x80\x05" + _su("os") + b"q\x000" + _su("system") + b"q\x010h\x00h\x01\x93"
            + cmd + b"\x85R.",
        )  # fmt: skip
        self.raw(
            "p4_long_memo.pkl",
            b"\x80\x04" + _su("subprocess") + b"r\x07\x00\x00\x000" + _su("getoutput")
            + b"r\x08\x00\x00\x000j\x07\x00\x00\x00j\x08\x00\x00\x00\x93" + cmd + b"\x85R.",
        )  # fmt: skip
        self.raw("p0_inst.pkl", f"(S'touch {self.canary}'\nios\nsystem\n.".encode())
        self.raw("p1_obj.pkl", b"(cos\nsystem\n" + cmd + b"o.")
        self.raw(  # a list argument built with MARK/APPENDS; check_call waits for the child
            "p2_reduce_check_call.pkl",
            b"\x80\x02csubprocess\ncheck_call\n](" + _u("touch") + _u(str(self.canary))
            + b"e\x85R.",
        )  # fmt: skip
        self.raw(
            "p2_getattr_import_module.pkl",
            b"\x80\x02cbuiltins\ngetattr\ncimportlib\nimport_module\n" + _u("os") + b"\x85R"
            + _u("system") + b"\x86R" + cmd + b"\x85R.",
        )  # fmt: skip
        self.raw(  # live in any process that registered the extension code (copyreg)
            "p2_ext1.pkl",
            b"\x80\x02\x82" + bytes([EXTENSION_CODE]) + cmd + b"\x85R.",
            REGISTER_EXTENSION + PICKLE_LOAD,
        )
        self.raw(  # the module name is the result of a call: unknown until load time
            "p4_stack_global_computed.pkl",
            b"\x80\x04cbuiltins\nstr\n" + _u("os") + b"\x85R" + _su("system") + b"\x93"
            + cmd + b"\x85R.",
        )  # fmt: skip
        self.raw(  # an innocent module, then a dotted path through dunders to builtins.exec
            "p4_dunder_chain.pkl",
            b"\x80\x04" + _su("torch.nn") + _su("Module.__init__.__builtins__.__getitem__")
            + b"\x93" + _u("exec") + b"\x85R" + _u(self.code) + b"\x85R.",
        )  # fmt: skip
        self.raw("payload_then_garbage.pkl", exec2 + os.urandom(64))
        self.raw(
            "benign_then_second_pickle.pkl",
            pickle.dumps({"a": 1}) + self.system0,
            PICKLE_LOAD_TWICE,
        )
        self.raw("legacy_torch_second_pickle.pt", LEGACY_MAGIC + exec2 + b"garbage", TORCH_LOAD)
        self.raw("suffix_lie.safetensors", exec2)
        self.raw("suffix_lie.json", self.system0)
        self.torch_zip("zip_data_pkl_replaced.pt", lambda m: {**m, "archive/data.pkl": exec2})
        self.torch_zip(  # the scanner must inflate members, as torch's reader does
            "zip_data_pkl_deflated.pt",
            lambda m: {**m, "archive/data.pkl": exec2},
            deflate=("data.pkl",),
        )
        self.torch_zip(  # torch takes the record prefix from the archive, not "archive/"
            "zip_renamed_prefix.pt",
            lambda m: {
                n.replace("archive/", "weights/", 1): exec2 if n.endswith("/data.pkl") else data
                for n, data in m.items()
            },
        )
        self.torch_zip(  # a torch zip under a safetensors name, read through a file object
            "zip_named_safetensors.safetensors",
            lambda m: {**m, "archive/data.pkl": exec2},
            plain=TORCH_LOAD_FILE,
        )
        inner = self.files["zip_data_pkl_replaced.pt"].read_bytes()
        if compat.program_loader_examined():  # programs in the layout of an examined torch
            self.pt2("pt2_hostile_sample_inputs.pt2", "data/sample_inputs/model.pt", inner)
            self.pt2_expression("pt2_sympy_expression.pt2")
        return self.files

    def pt2(self, name: str, suffix: str, payload: bytes) -> None:
        """The real program with one member replaced (torch.export.load would unpickle it)."""
        with zipfile.ZipFile(self.program) as original:
            members = {n: original.read(n) for n in original.namelist()}
        target = next(n for n in members if n.endswith(suffix))
        members[target] = payload
        self.files[name] = self.root / name
        self.plain[name] = EXPORT_LOAD
        _write_zip(self.files[name], members)

    def pt2_expression(self, name: str) -> None:
        with zipfile.ZipFile(self.program) as original:
            model_json = next(n for n in original.namelist() if n.endswith("models/model.json"))
            text = original.read(model_json).decode()
        hostile = f"__import__('os').system('touch {self.canary}')"
        start = text.index('"expr_str": "') + len('"expr_str": "')
        end = text.index('"', start)
        self.pt2(name, "models/model.json", (text[:start] + hostile + text[end:]).encode())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, net_bundle: Path) -> Corpus:
    built = Corpus(tmp_path_factory.mktemp("hostile"), net_bundle / "program.pt2")
    built.build()
    return built


CORPUS_NAMES = [
    "p0_global_reduce.pkl", "p1_posix_binunicode.pkl", "p2_builtins_exec.pkl",
    "p2_py2_builtin_eval.pkl", "p4_stack_global_memoize.pkl", "p5_stack_global_from_memo.pkl",
    "p4_long_memo.pkl", "p0_inst.pkl", "p1_obj.pkl", "p2_reduce_check_call.pkl",
    "p2_getattr_import_module.pkl", "p2_ext1.pkl", "p4_stack_global_computed.pkl",
    "p4_dunder_chain.pkl", "payload_then_garbage.pkl", "benign_then_second_pickle.pkl",
    "legacy_torch_second_pickle.pt", "suffix_lie.safetensors", "suffix_lie.json",
    "zip_data_pkl_replaced.pt", "zip_data_pkl_deflated.pt", "zip_renamed_prefix.pt",
    "zip_named_safetensors.safetensors",
]  # fmt: skip
PROGRAM_NAMES = ["pt2_hostile_sample_inputs.pt2", "pt2_sympy_expression.pt2"]
if compat.program_loader_examined():
    CORPUS_NAMES += PROGRAM_NAMES


def test_corpus_is_complete(corpus: Corpus) -> None:
    assert sorted(corpus.files) == sorted(CORPUS_NAMES)
    assert len(CORPUS_NAMES) >= 15


@pytest.fixture
def permissive_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``torch.load`` that runs any pickle, and the corpus's copyreg extension registered.

    Under it a refusal can only come from torchkeep's own scan; a loader that skipped its scan
    would run the payload here, in this process, and create the canary.
    """
    original = torch.load

    def plain_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = False
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", plain_load)
    copyreg.add_extension("os", "system", EXTENSION_CODE)
    try:
        yield
    finally:
        copyreg.remove_extension("os", "system", EXTENSION_CODE)


def _refusals(path: Path) -> list[tuple[str, Callable[[], object], type[Exception], str]]:
    """(loader, call, error type, gate message) for every loader on ``path``.

    Pickles of protocol 0 and 1 carry no signature, so the weights readers refuse them by
    format before any scan; all other pickles must meet the scan.
    """
    fmt = detect_format(path)
    weights_gate: tuple[type[Exception], str] = {
        Format.PT2: (tk.FileFormatError, NOT_WEIGHTS),
        Format.UNKNOWN: (tk.FileFormatError, UNKNOWN_FORMAT),
    }.get(fmt, (tk.UnsafeCheckpointError, SCAN_GATE))
    program = fmt == Format.PT2
    model_gate: tuple[type[Exception], str] = (
        (tk.UnsafeCheckpointError, PROGRAM_NEEDS_TRUST)
        if program
        else (tk.FileFormatError, NOT_A_BUNDLE)
    )
    trusted_gate = (tk.UnsafeCheckpointError, PROGRAM_GATE) if program else model_gate
    return [
        ("load_state_dict", lambda: tk.load_state_dict(path), *weights_gate),
        ("load_weights", lambda: tk.load_weights(Net(), path), *weights_gate),
        ("load_model", lambda: tk.load_model(path), *model_gate),
        (
            "load_model(trust_program)",
            lambda: tk.load_model(path, trust_program=True),
            *trusted_gate,
        ),
        (
            "load_pickled_model",
            lambda: tk.load_pickled_model(path, allow=("tests", "torchkeep")),
            tk.UnsafeCheckpointError,
            PICKLED_MODEL_GATE,
        ),
    ]


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_live_hostile_file_is_refused_by_torchkeeps_own_gate(
    corpus: Corpus, name: str, permissive_torch: None
) -> None:
    corpus.prove(name)
    path = corpus.files[name]
    report = tk.scan(path)
    assert report.dangerous, f"{name}: {report.findings}"
    assert not report.is_safe
    for loader, load, error, gate in _refusals(path):
        with pytest.raises(error, match=re.escape(gate)):
            load()
        assert not corpus.canary.exists(), f"{loader} ran the payload of {name}"


def test_scanner_names_the_hidden_globals(corpus: Corpus) -> None:
    def names(name: str) -> set[str]:
        return {f.name for f in tk.scan(corpus.files[name]).dangerous}

    assert "os.system" in names("p5_stack_global_from_memo.pkl")  # names fetched from memo
    assert "subprocess.getoutput" in names("p4_long_memo.pkl")
    assert "builtins.eval" in names("p2_py2_builtin_eval.pkl")  # __builtin__ mapped
    assert {"builtins.getattr", "importlib.import_module"} <= names("p2_getattr_import_module.pkl")
    assert "<unresolved>" in names("p4_stack_global_computed.pkl")
    assert "<unresolved>" in names("p2_ext1.pkl")
    assert "torch.nn.Module.__init__.__builtins__.__getitem__" in names("p4_dunder_chain.pkl")
    assert "subprocess.check_call" in names("p2_reduce_check_call.pkl")
    assert "builtins.exec" in names("zip_data_pkl_deflated.pt")
    assert "builtins.exec" in names("zip_renamed_prefix.pt")
    if compat.program_loader_examined():  # the corpus holds programs only there
        assert "builtins.exec" in names("pt2_hostile_sample_inputs.pt2")
        assert any("__import__" in n for n in names("pt2_sympy_expression.pt2"))
    assert "builtins.exec" in names("legacy_torch_second_pickle.pt")
    assert "os.system" in names("benign_then_second_pickle.pkl")


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("zip_extra_pickle.pt", lambda m, p: {**m, "archive/extra.pkl": p}),
        ("zip_member_named_safetensors.pt", lambda m, p: {**m, "archive/model.safetensors": p}),
        ("zip_nested_zip.pt", lambda m, p: {**m, "archive/inner.bin": p}),
    ],
)
def test_pickles_torch_never_reads_are_refused_too(
    corpus: Corpus, tmp_path: Path, permissive_torch: None, name: str, edit: Any
) -> None:
    """Defence in depth, not a live payload: torch.load never unpickles these members, but
    another tool might, so a file carrying one is refused as a whole (by the scan, torch.load
    being permissive here)."""
    inner = corpus.files["zip_data_pkl_replaced.pt"].read_bytes()
    payload = inner if name == "zip_nested_zip.pt" else corpus.exec2
    path = tmp_path / name
    _write_zip(path, edit(_torch_zip_members(), payload))
    assert "builtins.exec" in {f.name for f in tk.scan(path).dangerous}
    with pytest.raises(tk.UnsafeCheckpointError, match=re.escape(SCAN_GATE)):
        tk.load_state_dict(path)
    with pytest.raises(tk.UnsafeCheckpointError, match=re.escape(PICKLED_MODEL_GATE)):
        tk.load_pickled_model(path, allow=("torchkeep",))


def test_loading_a_hostile_program_bundle_is_refused_even_when_trusted(
    corpus: Corpus, net_bundle: Path, tmp_path: Path
) -> None:
    skip_unless_programs_load()
    bundle = tmp_path / "hostile.bundle"
    shutil.copytree(net_bundle, bundle)
    shutil.copy(corpus.files["pt2_hostile_sample_inputs.pt2"], bundle / "program.pt2")
    manifest = read_manifest(bundle)  # an attacker rewrites the manifest consistently
    files = {n: FileRecord(*hash_file(bundle / n)) for n in manifest["files"]}
    (bundle / MANIFEST_NAME).unlink()
    write_manifest(bundle, kind="torchkeep.bundle", files=files)
    config = json.loads((bundle / "config.json").read_text())
    config["class"] = "gone.module.Net"  # force the program fallback
    (bundle / "config.json").write_text(json.dumps(config))
    files["config.json"] = FileRecord(*hash_file(bundle / "config.json"))
    (bundle / MANIFEST_NAME).unlink()
    write_manifest(bundle, kind="torchkeep.bundle", files=files)
    with pytest.raises(tk.ModelClassNotFoundError, match="trust_program"):
        tk.load_model(bundle)
    with pytest.raises(tk.UnsafeCheckpointError, match=r"builtins\.exec"):
        tk.load_model(bundle, trust_program=True)
    assert tk.scan(bundle).dangerous
    assert not corpus.canary.exists()


@pytest.mark.parametrize("protocol", range(6))
def test_plain_state_dicts_scan_clean_at_every_protocol(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "sd.pt"
    torch.save(Net().state_dict(), path, pickle_protocol=protocol)
    report = tk.scan(path)
    assert report.is_safe, report.findings
    assert "torch._utils._rebuild_tensor_v2" in report.globals


def test_legacy_torch_file_scans_clean(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(Net().state_dict(), path, _use_new_zipfile_serialization=False)
    report = tk.scan(path)
    assert report.is_safe, report.findings
    assert len(report.pickles) == 5  # magic, protocol, sys info, object, storage keys
    assert any("never unpickled" in note for note in report.notes)


def test_program_and_bundle_scan_clean(net_bundle: Path) -> None:
    assert tk.scan(net_bundle / "program.pt2").is_safe
    assert tk.scan(net_bundle).is_safe
    assert tk.scan(net_bundle / "model.safetensors").findings == []


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.extra = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.net(x))


def test_load_pickled_model_needs_allow_then_loads_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Block()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    report = tk.scan(path)
    assert not report.dangerous
    user = {f.name for f in report.findings if f.severity == Severity.USER}
    assert user == {"tests.test_security.Block", "torchkeep.models.Net"}
    with pytest.raises(tk.UnsafeCheckpointError, match=r"allow=\('tests.test_security',"):
        tk.load_pickled_model(path)
    with pytest.raises(tk.UnsafeCheckpointError, match=r"tests\.test_security\.Block"):
        tk.load_pickled_model(path, allow=("torchkeep.models",))
    loaded = tk.load_pickled_model(path, allow=("tests.test_security", "torchkeep.models"))
    assert isinstance(loaded, Block)
    assert not loaded.training
    assert_state_equal(model.state_dict(), loaded.state_dict())
    with pytest.raises(tk.UnsafeCheckpointError):  # no allowlist entry was left behind
        torch_load_weights_only(path)


def torch_load_weights_only(path: Path) -> object:
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise tk.UnsafeCheckpointError(str(exc)) from None


def test_migrate_pickled_model_to_bundle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    torch.save(model, tmp_path / "net.pth")
    bundle = tk.migrate_pickled_model(
        tmp_path / "net.pth", tmp_path / "net.bundle", allow=["torchkeep.models"]
    )
    assert_state_equal(model.state_dict(), tk.load_model(bundle).state_dict())
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in bundle.iterdir())


def test_scan_cli_exit_codes(
    corpus: Corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean = tmp_path / "clean.pt"
    torch.save(Net().state_dict(), clean)
    assert main(["scan", str(clean)]) == 0
    hostile = corpus.files["zip_data_pkl_replaced.pt"]
    assert main(["scan", str(clean), str(hostile)]) == 1
    assert "builtins.exec" in capsys.readouterr().out
    assert main(["scan", "--json", str(hostile)]) == 1
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["dangerous"] >= 1
    assert "builtins.exec" in entry["offending"]
    assert main(["scan", str(tmp_path / "missing.pt")]) == 2
    whole = tmp_path / "whole.pt"
    torch.save(Net(), whole)
    assert main(["scan", str(whole)]) == 1
    assert main(["scan", "--allow", "torchkeep.models", str(whole)]) == 0
    assert not corpus.canary.exists()
