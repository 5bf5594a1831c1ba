"""The static pickle scanner against a generated corpus of hostile files, and guarded loading."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests.conftest import assert_state_equal
from torchkeep.cli import main
from torchkeep.hashing import hash_file
from torchkeep.manifest import MANIFEST_NAME, FileRecord, read_manifest, write_manifest
from torchkeep.models import Net
from torchkeep.security import Severity

LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def _u(text: str) -> bytes:
    """BINUNICODE (protocol 1+)."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _su(text: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4+)."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


class Corpus:
    """Hostile files whose payload would create ``canary`` if anything ever ran them."""

    def __init__(self, root: Path, program: Path) -> None:
        self.root = root
        self.canary = root / "CANARY"
        self.program = program
        cmd = f"touch {self.canary}"
        code = f"open({str(self.canary)!r}, 'w').close()"
        self.system0 = f"cos\nsystem\n(S'{cmd}'\ntR.".encode()
        self.exec2 = b"\x80\x02cbuiltins\nexec\n" + _u(code) + b"\x85R."
        self.files: dict[str, Path] = {}

    def raw(self, name: str, data: bytes) -> None:
        self.files[name] = self.root / name
        self.files[name].write_bytes(data)

    def torch_zip(self, name: str, edit: Callable[[dict[str, bytes]], None]) -> None:
        buffer = io.BytesIO()
        torch.save(Net().state_dict(), buffer)
        with zipfile.ZipFile(buffer) as original:
            members = {n: original.read(n) for n in original.namelist()}
        edit(members)
        self.files[name] = self.root / name
        with zipfile.ZipFile(self.files[name], "w") as archive:
            for member, data in members.items():
                archive.writestr(member, data)

    def build(self) -> dict[str, Path]:
        cmd = _u(f"touch {self.canary}")
        self.raw("p0_global_reduce.pkl", self.system0)
        self.raw("p1_posix_binunicode.pkl", b"cposix\nsystem\n(" + cmd + b"tR.")
        self.raw("p2_builtins_exec.pkl", self.exec2)
        self.raw("p3_py2_builtin_eval.pkl", b"\x80\x03c__builtin__\neval\n" + _u("1") + b"\x85R.")
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
        self.raw("p2_newobj_popen.pkl", b"\x80\x02csubprocess\nPopen\n]" + cmd + b"a\x85\x81.")
        self.raw(
            "p2_getattr_import_module.pkl",
            b"\x80\x02cbuiltins\ngetattr\ncimportlib\nimport_module\n" + _u("os") + b"\x85R"
            + _u("system") + b"\x86R" + cmd + b"\x85R.",
        )  # fmt: skip
        self.raw("p2_ext1.pkl", b"\x80\x02\x82\x01" + cmd + b"\x85R.")
        self.raw(  # the module name is the result of a call: unknown until load time
            "p4_stack_global_computed.pkl",
            b"\x80\x04cbuiltins\nstr\n" + _u("os") + b"\x85R" + _su("system") + b"\x93"
            + cmd + b"\x85R.",
        )  # fmt: skip
        self.raw(
            "p4_dunder_chain.pkl",
            b"\x80\x04" + _su("torchkeep.models") + _su("Net.__init__.__globals__") + b"\x93.",
        )
        self.raw("payload_then_garbage.pkl", self.exec2 + os.urandom(64))
        self.raw("benign_then_second_pickle.pkl", pickle.dumps({"a": 1}) + self.system0)
        self.raw("legacy_torch_second_pickle.pt", LEGACY_MAGIC + self.exec2 + b"garbage")
        self.raw("suffix_lie.safetensors", self.exec2)
        self.raw("suffix_lie.json", self.system0)
        self.torch_zip(
            "zip_data_pkl_replaced.pt", lambda m: m.update({"archive/data.pkl": self.exec2})
        )
        self.torch_zip("zip_extra_pickle.pt", lambda m: m.update({"archive/extra.pkl": self.exec2}))
        self.torch_zip(
            "zip_misleading_name.pt",
            lambda m: m.update({"archive/model.safetensors": self.exec2}),
        )
        inner = self.files["zip_data_pkl_replaced.pt"].read_bytes()
        self.torch_zip("zip_nested_zip.pt", lambda m: m.update({"archive/inner.bin": inner}))
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
        with zipfile.ZipFile(self.files[name], "w") as archive:
            for member, data in members.items():
                archive.writestr(member, data)

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
    "p3_py2_builtin_eval.pkl", "p4_stack_global_memoize.pkl", "p5_stack_global_from_memo.pkl",
    "p4_long_memo.pkl", "p0_inst.pkl", "p1_obj.pkl", "p2_newobj_popen.pkl",
    "p2_getattr_import_module.pkl", "p2_ext1.pkl", "p4_stack_global_computed.pkl",
    "p4_dunder_chain.pkl", "payload_then_garbage.pkl", "benign_then_second_pickle.pkl",
    "legacy_torch_second_pickle.pt", "suffix_lie.safetensors", "suffix_lie.json",
    "zip_data_pkl_replaced.pt", "zip_extra_pickle.pt", "zip_misleading_name.pt",
    "zip_nested_zip.pt", "pt2_hostile_sample_inputs.pt2", "pt2_sympy_expression.pt2",
]  # fmt: skip


def test_corpus_is_complete(corpus: Corpus) -> None:
    assert sorted(corpus.files) == sorted(CORPUS_NAMES)
    assert len(CORPUS_NAMES) >= 15


def _refusals(path: Path) -> list[tuple[str, Callable[[], object]]]:
    return [
        ("load_state_dict", lambda: tk.load_state_dict(path)),
        ("load_weights", lambda: tk.load_weights(Net(), path)),
        ("load_model", lambda: tk.load_model(path)),
        ("load_model(trust_program)", lambda: tk.load_model(path, trust_program=True)),
        ("load_pickled_model", lambda: tk.load_pickled_model(path, allow=("tests", "torchkeep"))),
    ]


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_hostile_file_is_flagged_and_refused_by_every_loader(corpus: Corpus, name: str) -> None:
    path = corpus.files[name]
    report = tk.scan(path)
    assert report.dangerous, f"{name}: {report.findings}"
    assert not report.is_safe
    for loader, load in _refusals(path):
        with pytest.raises(tk.TorchkeepError):
            load()
        assert not corpus.canary.exists(), f"{loader} ran the payload of {name}"
    with pytest.raises(tk.UnsafeCheckpointError):
        tk.load_pickled_model(path, allow=("tests", "torchkeep"))


def test_scanner_names_the_hidden_globals(corpus: Corpus) -> None:
    def names(name: str) -> set[str]:
        return {f.name for f in tk.scan(corpus.files[name]).dangerous}

    assert "os.system" in names("p5_stack_global_from_memo.pkl")  # names fetched from memo
    assert "subprocess.getoutput" in names("p4_long_memo.pkl")
    assert "builtins.eval" in names("p3_py2_builtin_eval.pkl")  # __builtin__ mapped
    assert {"builtins.getattr", "importlib.import_module"} <= names("p2_getattr_import_module.pkl")
    assert "<unresolved>" in names("p4_stack_global_computed.pkl")
    assert "<unresolved>" in names("p2_ext1.pkl")
    assert "builtins.exec" in names("zip_nested_zip.pt")
    assert "builtins.exec" in names("pt2_hostile_sample_inputs.pt2")
    assert any("__import__" in n for n in names("pt2_sympy_expression.pt2"))
    assert "builtins.exec" in names("legacy_torch_second_pickle.pt")
    assert "os.system" in names("benign_then_second_pickle.pkl")


def test_loading_a_hostile_program_bundle_is_refused_even_when_trusted(
    corpus: Corpus, net_bundle: Path, tmp_path: Path
) -> None:
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
    hostile = corpus.files["zip_extra_pickle.pt"]
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
