"""Hostile model bundles: code shipped inside a bundle, unlisted entries, hostile class paths
and config documents. Every code-running payload is first proven live with a plain import
(tests/_live.py), then torchkeep must refuse with its own typed error and the canary must
stay absent."""

from __future__ import annotations

import importlib
import json
import os
import py_compile
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torchkeep as tk
from tests._live import prove_live
from tests._source import SRC
from torchkeep.errors import InvalidDocumentError
from torchkeep.formats import Format, detect_format
from torchkeep.hashing import hash_file
from torchkeep.manifest import MANIFEST_NAME, FileRecord, read_manifest, write_manifest
from torchkeep.model import bundle as bundle_module
from torchkeep.model import classpath
from torchkeep.model.classpath import import_class
from torchkeep.models import Net

ENV = {**os.environ, "PYTHONPATH": str(SRC)}


def _payload(canary: Path) -> str:
    """A module that proves it ran by creating ``canary``, and defines a model class."""
    return f"open({str(canary)!r}, 'w').write('ran')\nclass Net:\n    pass\n"


def _forge(bundle: Path, target: object, *, listed: Iterable[str] = (), **config: Any) -> None:
    """Point ``config.json`` at ``target`` and re-record the manifest consistently, listing
    ``listed`` too, as an attacker who rewrites the whole bundle would."""
    document = json.loads((bundle / "config.json").read_text())
    document.update({"class": target, **config})
    (bundle / "config.json").write_text(json.dumps(document))
    names = [*read_manifest(bundle)["files"], *listed]
    files = {n: FileRecord(*hash_file(bundle / n)) for n in names}
    (bundle / MANIFEST_NAME).unlink()
    write_manifest(bundle, kind="torchkeep.bundle", files=files)


@dataclass
class Attack:
    """A bundle whose class path an import would resolve to a module shipped inside it."""

    bundle: Path
    cwd: Path  # where a plain `python -c "import <module>"` picks the bundle's module up
    target: str  # the class path in config.json
    canary: Path
    shipped: str  # the file an import would run, relative to the bundle
    preamble: str = ""  # Python run first (a sys.path change, a site dir with a .pth)

    @property
    def module(self) -> str:
        return self.target.rpartition(".")[0]


def _attack(
    tmp_path: Path,
    bundle_at: str,
    target: str,
    shipped: str,
    *,
    cwd: str = "work",
    preamble: str = "",
    listed: Iterable[str] = (),
) -> Attack:
    """Save a real bundle at ``tmp_path/bundle_at``, ship ``shipped`` in it (a payload, and an
    empty ``__init__.py`` where named ``*/__init__.py``), point its config at ``target``."""
    bundle = tmp_path / bundle_at
    bundle.parent.mkdir(parents=True, exist_ok=True)
    tk.save_model(Net(), bundle)
    (tmp_path / cwd).mkdir(parents=True, exist_ok=True)
    canary = tmp_path / "canary"
    module = bundle / shipped
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_text(_payload(canary))
    _forge(bundle, target, listed=listed)
    return Attack(bundle, tmp_path / cwd, target, canary, shipped, preamble)


def _bundle_is_a_namespace_package(tmp: Path) -> Attack:
    return _attack(tmp, "work/mymodel", "mymodel.weights_helper.Net", "weights_helper.py")


def _bundle_is_a_regular_package(tmp: Path) -> Attack:
    return _attack(tmp, "work/mymodel", "mymodel.Net", "__init__.py")


def _listed_python_file(tmp: Path) -> Attack:
    return _attack(
        tmp, "work/mymodel", "mymodel.weights_helper.Net", "weights_helper.py",
        listed=["weights_helper.py"],
    )  # fmt: skip


def _package_shipped_in_the_bundle(tmp: Path) -> Attack:
    attack = _attack(tmp, "work/mymodel", "pkg.net.Net", "pkg/net.py", cwd="work/mymodel")
    (attack.bundle / "pkg" / "__init__.py").write_text("")
    return attack


def _bundle_nested_in_a_plain_folder(tmp: Path) -> Attack:
    return _attack(tmp, "work/models/net", "models.net.helper.Net", "helper.py")


def _three_levels_inside(tmp: Path) -> Attack:
    return _attack(tmp, "work/mymodel", "mymodel.a.b.c.Net", "a/b/c.py")


def _bytecode_only_module(tmp: Path) -> Attack:
    attack = _attack(tmp, "work/mymodel", "mymodel.helper.Net", "helper_src.py")
    source = attack.bundle / "helper_src.py"
    py_compile.compile(str(source), cfile=str(attack.bundle / "helper.pyc"), doraise=True)
    source.unlink()
    attack.shipped = "helper.pyc"
    return attack


def _symlink_to_the_bundle(tmp: Path) -> Attack:
    attack = _attack(tmp, "store/bundle", "shortcut.helper.Net", "helper.py")
    (attack.cwd / "shortcut").symlink_to(attack.bundle, target_is_directory=True)
    return attack


def _symlink_to_a_shipped_module(tmp: Path) -> Attack:
    attack = _attack(tmp, "work/mymodel", "helper.Net", "helper.py")
    (attack.cwd / "helper.py").symlink_to(attack.bundle / "helper.py")
    return attack


def _hard_link_to_a_shipped_module(tmp: Path) -> Attack:
    attack = _attack(tmp, "work/mymodel", "helper.Net", "helper.py")
    os.link(attack.bundle / "helper.py", attack.cwd / "helper.py")
    return attack


def _bundle_on_sys_path(tmp: Path) -> Attack:
    bundle = tmp / "work" / "mymodel"
    preamble = f"import sys\nsys.path.insert(0, {str(bundle)!r})"
    return _attack(tmp, "work/mymodel", "helper.Net", "helper.py", cwd="elsewhere",
                   preamble=preamble)  # fmt: skip


def _pth_file_points_into_the_bundle(tmp: Path) -> Attack:
    site_dir = tmp / "site"
    site_dir.mkdir()
    (site_dir / "extra.pth").write_text(str(tmp / "work" / "mymodel" / "lib") + "\n")
    preamble = f"import site\nsite.addsitedir({str(site_dir)!r})"
    return _attack(tmp, "work/mymodel", "helper.Net", "lib/helper.py", cwd="elsewhere",
                   preamble=preamble)  # fmt: skip


def _namespace_package_spanning_the_bundle(tmp: Path) -> Attack:
    vendor = tmp / "vendor"
    (vendor / "ns").mkdir(parents=True)
    (vendor / "ns" / "good.py").write_text("class Net:\n    pass\n")
    preamble = f"import sys\nsys.path.append({str(vendor)!r})"
    return _attack(tmp, "work/ns", "ns.evil.Net", "evil.py", preamble=preamble)


ATTACKS: list[Callable[[Path], Attack]] = [
    _bundle_is_a_namespace_package,
    _bundle_is_a_regular_package,
    _listed_python_file,
    _package_shipped_in_the_bundle,
    _bundle_nested_in_a_plain_folder,
    _three_levels_inside,
    _bytecode_only_module,
    _symlink_to_the_bundle,
    _symlink_to_a_shipped_module,
    _hard_link_to_a_shipped_module,
    _bundle_on_sys_path,
    _pth_file_points_into_the_bundle,
    _namespace_package_spanning_the_bundle,
]

_LOAD_CHILD = """
{preamble}
import torchkeep as tk
try:
    tk.load_model({bundle!r})
except tk.UnsafeBundleError as exc:
    print("REFUSED", exc)
"""


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Callable[[Attack], None]:
    """Give this process the import state the plain import had (cwd and sys.path), undone
    after the test."""

    def enter(attack: Attack) -> None:
        monkeypatch.chdir(attack.cwd)
        monkeypatch.setattr(sys, "path", ["", *sys.path])
        exec(attack.preamble, {})  # the test's own sys.path / site-dir set-up
        importlib.invalidate_caches()

    return enter


@pytest.mark.parametrize("build", ATTACKS, ids=lambda build: build.__name__.strip("_"))
def test_code_shipped_in_a_bundle_is_never_imported(
    build: Callable[[Path], Attack], tmp_path: Path, isolated_imports: Callable[[Attack], None]
) -> None:
    attack = build(tmp_path)
    prove_live(f"{attack.preamble}\nimport {attack.module}", attack.canary, cwd=attack.cwd)

    # load_model in a fresh interpreter, from the folder where the plain import fired
    child = _python(["-c", _LOAD_CHILD.format(preamble=attack.preamble, bundle=str(attack.bundle))],
                    attack.cwd)  # fmt: skip
    assert "REFUSED" in child.stdout, child.stdout + child.stderr
    assert attack.target in child.stdout
    assert not attack.canary.exists()

    # the import guard on its own (the unlisted-entry check above would hide it)
    isolated_imports(attack)
    with pytest.raises(tk.UnsafeBundleError, match="inside the bundle") as info:
        import_class(attack.target, attack.bundle)
    message = str(info.value)
    assert attack.target in message
    assert "To fix:" in message
    assert Path(attack.shipped).name in message or str(attack.bundle) in message
    with pytest.raises(tk.UnsafeBundleError, match=r"does not (list|account)"):
        tk.load_model(attack.bundle)
    assert not attack.canary.exists()


def test_the_guard_names_the_file_an_import_would_run(
    tmp_path: Path, isolated_imports: Callable[[Attack], None]
) -> None:
    attack = _bundle_is_a_namespace_package(tmp_path)
    isolated_imports(attack)
    with pytest.raises(tk.UnsafeBundleError) as info:
        import_class(attack.target, attack.bundle)
    assert str(attack.bundle / "weights_helper.py") in str(info.value)
    assert "'mymodel.weights_helper'" in str(info.value)


@pytest.mark.parametrize(
    ("command", "code"),
    [(["inspect"], 0), (["verify"], 1), (["export-onnx", "--input-shape", "1,3,32,32"], 2)],
    ids=["inspect", "verify", "export-onnx"],
)
@pytest.mark.parametrize(
    "build", [_bundle_is_a_namespace_package, _package_shipped_in_the_bundle],
    ids=["bundle-is-package", "package-in-bundle"],
)  # fmt: skip
def test_cli_commands_never_import_code_from_a_bundle(
    command: list[str], code: int, build: Callable[[Path], Attack], tmp_path: Path
) -> None:
    attack = build(tmp_path)
    prove_live(f"import {attack.module}", attack.canary, cwd=attack.cwd)
    out = tmp_path / "out.onnx"
    args = [command[0], str(attack.bundle), *command[1:]]
    if command[0] == "export-onnx":
        args += ["-o", str(out)]
    result = _python(["-m", "torchkeep", *args], attack.cwd)
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output
    assert "not listed in the manifest" in " ".join(output.split())
    assert not attack.canary.exists()
    assert not out.exists()


def test_a_module_already_imported_from_a_bundle_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attack = _bundle_is_a_namespace_package(tmp_path)
    prove_live(f"import {attack.module}", attack.canary, cwd=attack.cwd)
    package = ModuleType("mymodel")
    package.__path__ = [str(attack.bundle)]
    helper = ModuleType("mymodel.weights_helper")
    helper.__file__ = str(attack.bundle / "weights_helper.py")
    helper.Net = Net  # type: ignore[attr-defined]  # would pass the class check
    monkeypatch.setitem(sys.modules, "mymodel", package)
    monkeypatch.setitem(sys.modules, "mymodel.weights_helper", helper)
    with pytest.raises(tk.UnsafeBundleError, match="weights_helper"):
        import_class(attack.target, attack.bundle)


def test_loading_from_inside_a_clean_bundle_is_refused_with_the_fix(
    tmp_path: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tk.save_model(net, tmp_path / "net")
    monkeypatch.chdir(bundle)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    with pytest.raises(tk.UnsafeBundleError, match=r"sys\.path holds '' \(the current folder"):
        tk.load_model(".")
    monkeypatch.chdir(tmp_path)
    assert type(tk.load_model("net")) is Net


# ---- entries the manifest does not list -------------------------------------------------


def _extra_file(bundle: Path) -> str:
    (bundle / "notes.txt").write_text("hello")
    return "notes.txt"


def _hidden_file(bundle: Path) -> str:
    (bundle / ".DS_Store").write_bytes(b"\0")
    return ".DS_Store"


def _empty_folder(bundle: Path) -> str:
    (bundle / "sub").mkdir()
    return "sub"


def _file_in_a_folder(bundle: Path) -> str:
    (bundle / "sub").mkdir()
    (bundle / "sub" / "x.py").write_text("")
    return "x.py"


def _dangling_symlink(bundle: Path) -> str:
    (bundle / "link").symlink_to(bundle.parent / "nowhere")
    return "link"


def _listed_file_replaced_by_symlink(bundle: Path) -> str:
    real = bundle.parent / "weights.safetensors"
    (bundle / "model.safetensors").rename(real)
    (bundle / "model.safetensors").symlink_to(real)
    return "model.safetensors is a symbolic link"


def _listed_foreign_file(bundle: Path) -> str:
    (bundle / "run.pth").write_text("import os\n")
    _forge(bundle, "torchkeep.models.Net", listed=["run.pth"])
    return "run.pth"


@pytest.mark.parametrize(
    "add",
    [_extra_file, _hidden_file, _empty_folder, _file_in_a_folder, _dangling_symlink,
     _listed_file_replaced_by_symlink, _listed_foreign_file],
    ids=lambda add: add.__name__.strip("_"),
)  # fmt: skip
def test_unlisted_entries_fail_verify_and_are_refused_by_load_model(
    add: Callable[[Path], str], tmp_path: Path, net: Net
) -> None:
    bundle = tk.save_model(net, tmp_path / "net")
    assert tk.verify(bundle).ok
    named = add(bundle)
    report = tk.verify(bundle)
    assert not report.ok
    assert any(named in problem for problem in report.problems), report.problems
    with pytest.raises(tk.UnsafeBundleError, match=r"torchkeep\.models\.Net") as info:
        tk.load_model(bundle)
    assert named in str(info.value)


def test_files_torchkeep_writes_are_all_listed(net_bundle: Path) -> None:
    report = tk.verify(net_bundle)
    assert report.ok, report.problems
    assert {p.name for p in net_bundle.iterdir()} == {
        "config.json", "manifest.json", "model.safetensors", "program.pt2",
    }  # fmt: skip


# ---- hostile class paths ------------------------------------------------------------------

CLASS_REFUSED = "class is not a valid class path"

HOSTILE_CLASS_PATHS: list[object] = [
    "", "Net", ".Net", "..x.Net", "torchkeep..Net", "torchkeep.models.", " torchkeep.Net",
    "torchkeep.models.Net()", "torch.nn/Linear", "import.Net", "x.1Net", "os.path.__class__",
    "torchkeep.__init__.Net", "builtins.__import__", "ｔｏｒｃｈ.nn.Linear", "a." * 600 + "Net",
    None, 42, ["torchkeep.models.Net"], {"module": "torchkeep.models"},
]  # fmt: skip


@pytest.fixture
def no_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if torchkeep tries to import anything by name."""

    def refuse(name: str, package: str | None = None) -> ModuleType:
        raise AssertionError(f"torchkeep imported {name!r}")

    monkeypatch.setattr(classpath, "importlib", SimpleNamespace(import_module=refuse))


@pytest.mark.parametrize("target", HOSTILE_CLASS_PATHS, ids=repr)
@pytest.mark.usefixtures("no_imports")
def test_hostile_class_path_in_config_is_a_typed_error_before_any_import(
    target: object, tmp_path: Path, net: Net
) -> None:
    bundle = tk.save_model(net, tmp_path / "net")
    _forge(bundle, target)
    with pytest.raises(
        InvalidDocumentError, match=rf"config\.json is not .*: {CLASS_REFUSED}"
    ) as info:
        tk.load_model(bundle)
    assert "re-save it with tk.save_model" in str(info.value)
    report = tk.verify(bundle)
    assert any(CLASS_REFUSED in problem for problem in report.problems)


@pytest.mark.parametrize("target", HOSTILE_CLASS_PATHS, ids=repr)
@pytest.mark.usefixtures("no_imports")
def test_hostile_alias_targets_are_typed_errors_before_any_import(
    target: object, tmp_path: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle_module, "_ALIASES", {})
    bundle = tk.save_model(net, tmp_path / "net")
    aliases: Any = {"torchkeep.models.Net": target}
    with pytest.raises(tk.ModelClassNotFoundError, match="not a valid class path"):
        tk.load_model(bundle, aliases=aliases)
    with pytest.raises(tk.ModelClassNotFoundError, match="not a valid class path"):
        tk.register_alias("torchkeep.models.Net", target)  # type: ignore[arg-type]
    with pytest.raises(tk.ModelClassNotFoundError, match="not a valid class path"):
        tk.register_alias(target, "torchkeep.models.Net")  # type: ignore[arg-type]
    assert bundle_module._ALIASES == {}


@pytest.mark.parametrize(
    "target",
    ["os.system", "torchkeep.models.Net.forward", "math.pi", "torch.Tensor", "torch.nn",
     "collections.OrderedDict", "torchkeep.models.small_vgg"],
)  # fmt: skip
def test_a_class_path_naming_anything_but_a_module_class_is_refused(
    target: str, tmp_path: Path, net: Net
) -> None:
    bundle = tk.save_model(net, tmp_path / "net")
    _forge(bundle, target)
    with pytest.raises(tk.ModelClassNotFoundError, match=r"not an nn\.Module subclass"):
        tk.load_model(bundle)


def test_an_alias_into_a_bundle_gets_the_same_guard(
    tmp_path: Path, isolated_imports: Callable[[Attack], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    attack = _bundle_is_a_namespace_package(tmp_path)
    _forge(attack.bundle, "old.place.Net")  # the bundle names a missing class; the alias is bad
    prove_live(f"import {attack.module}", attack.canary, cwd=attack.cwd)
    isolated_imports(attack)
    monkeypatch.setattr(bundle_module, "_ALIASES", {})
    aliases = {"old.place.Net": attack.target}
    with pytest.raises(tk.UnsafeBundleError, match="does not account for"):
        tk.load_model(attack.bundle, aliases=aliases)
    with pytest.raises(tk.UnsafeBundleError, match="inside the bundle"):
        import_class(bundle_module._alias_target("old.place.Net", aliases), attack.bundle)
    tk.register_alias("old.place.Net", attack.target)
    with pytest.raises(tk.UnsafeBundleError, match="inside the bundle"):
        import_class(bundle_module._alias_target("old.place.Net", {}), attack.bundle)
    assert not attack.canary.exists()


# ---- config.json schema -------------------------------------------------------------------

_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ("[]", "the document must be an object"),
        ('{"class": "torchkeep.models.Net"}', "init"),
        ('{"init": {"args": [], "kwargs": {}}}', "class"),
        ('{"class": "torchkeep.models.Net", "init": []}', "init"),
        ('{"class": "torchkeep.models.Net", "init": {"args": {}, "kwargs": {}}}', "init.args"),
        ('{"class": "torchkeep.models.Net", "init": {"args": [], "kwargs": 3}}', "init.kwargs"),
        ('{"class": "torchkeep.models.Net", "init": {}, "example_inputs": "x"}',
         "example_inputs"),
        ('{"class": "torchkeep.models.Net", "init": {}, "example_inputs": [5]}',
         "example_inputs[0]"),
        ('{"class": "torchkeep.models.Net", "init": {}, '
         '"example_inputs": [{"shape": [1, -3], "dtype": "float32"}]}',
         "example_inputs[0].shape[1]"),
        ('{"class": "torchkeep.models.Net", "init": {}, '
         '"example_inputs": [{"shape": [65536, 65536, 65536], "dtype": "float32"}]}',
         "example_inputs[0].shape"),
        ('{"class": "torchkeep.models.Net", "init": {}, '
         '"example_inputs": [{"shape": [true], "dtype": "float32"}]}',
         "example_inputs[0].shape[0]"),
        ('{"class": "torchkeep.models.Net", "init": {}, '
         '"example_inputs": [{"shape": [1], "dtype": "load"}]}',
         "example_inputs[0].dtype"),
        ('{"class": "torchkeep.models.Net", "init": {}, '
         '"example_inputs": [{"shape": [1], "dtype": 5}]}',
         "example_inputs[0].dtype"),
        ('{"class": "torchkeep.models.Net", "init": {"args": [' + "9" * 5000 + "]}}",
         "5000 digits"),
        ('{"class": "torchkeep.models.Net", "init": {"args": ' + _DEEP + "}}",
         "deeper than 64 levels"),
        ('{"class": "torchkeep.models.Net", "init": {"args": [{"$nope": 1}]}}', "init.args"),
        ('{"class": "torchkeep.models.Net", "init": {"kwargs": {"a": {"$tensor": "x"}}}}',
         "init.kwargs"),
        (b"\xff\xfe not json", "not UTF-8"),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else "bytes",
)  # fmt: skip
@pytest.mark.usefixtures("no_imports")
def test_invalid_config_is_a_typed_error_naming_file_and_key(
    document: str | bytes, key: str, tmp_path: Path, net: Net
) -> None:
    bundle = tk.save_model(net, tmp_path / "net")
    (bundle / "config.json").write_bytes(
        document if isinstance(document, bytes) else document.encode()
    )
    _forge_manifest_only(bundle)
    with pytest.raises(tk.CorruptFileError) as info:
        tk.load_model(bundle)
    message = str(info.value)
    assert "config.json" in message
    assert key in message, message
    assert not tk.verify(bundle).ok


def _forge_manifest_only(bundle: Path) -> None:
    names = list(read_manifest(bundle)["files"])
    files = {n: FileRecord(*hash_file(bundle / n)) for n in names}
    (bundle / MANIFEST_NAME).unlink()
    write_manifest(bundle, kind="torchkeep.bundle", files=files)


def test_an_oversized_config_is_refused_before_it_is_read(
    tmp_path: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep.model import config

    bundle = tk.save_model(net, tmp_path / "net")
    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 64)
    with pytest.raises(tk.CorruptFileError, match=r"config\.json .* more than the 64 allowed"):
        tk.load_model(bundle)


# ---- format detection and the CLI ---------------------------------------------------------


def test_a_substring_in_a_manifest_does_not_make_a_bundle_or_a_step(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    decoy = {"format": "my.notes", "comment": '"torchkeep.bundle" "torchkeep.checkpoint"',
             "files": {}}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(decoy))
    assert detect_format(folder) == Format.UNKNOWN
    (folder / "manifest.json").write_text('{"files": {}, "format": ' + '"torchkeep.bundle"' * 2)
    assert detect_format(folder) == Format.UNKNOWN  # not JSON
    (folder / "manifest.json").write_text("[" * 100_000 + '"torchkeep.bundle"' + "]" * 100_000)
    assert detect_format(folder) == Format.UNKNOWN  # too deep, and no RecursionError
    with pytest.raises(tk.FileFormatError):
        tk.verify(folder)
    (folder / "manifest.json").write_text('{"format": "torchkeep.bundle", "files": {}}')
    assert detect_format(folder) == Format.BUNDLE


def test_export_onnx_on_a_bundle_with_a_relative_class_is_a_one_line_error(
    tmp_path: Path, net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchkeep.cli import main

    bundle = tk.save_model(net, tmp_path / "net")
    _forge(bundle, "..x.Net")
    out = tmp_path / "x.onnx"
    code = main(["export-onnx", str(bundle), "-o", str(out), "--input-shape", "1,3,32,32"])
    captured = capsys.readouterr()
    assert code == 2
    assert CLASS_REFUSED in " ".join((captured.err + captured.out).split())
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()


@pytest.mark.parametrize("source", ["..x:Net", ":Net", "torchkeep.models:__class__", "a b:Net"])
def test_export_onnx_refuses_a_hostile_module_class_source(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torchkeep.cli import main

    out = tmp_path / "x.onnx"
    assert main(["export-onnx", source, "-o", str(out), "--input-shape", "1,3,32,32"]) == 2
    assert "not module:Class" in capsys.readouterr().err
    assert not out.exists()


# ---- no false positives, and fuzzing -----------------------------------------------------


def test_a_clean_bundle_named_like_a_package_loads_from_its_parent(
    tmp_path: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tk.save_model(net, tmp_path / "mymodel")  # importable as a namespace package
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    assert type(tk.load_model("mymodel")) is Net
    assert tk.verify(bundle).ok


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
_CONFIG_KEYS = st.sampled_from(["class", "init", "example_inputs", "args", "kwargs", "$tuple"])


@given(
    document=_JSON
    | st.dictionaries(_CONFIG_KEYS, _JSON | st.just("torchkeep.models.Net"), max_size=4)
    | st.fixed_dictionaries(
        {"class": st.just("torchkeep.models.Net"), "init": _JSON},
        optional={"example_inputs": _JSON},
    )
)
@settings(max_examples=300, deadline=None)
def test_config_validation_raises_only_typed_errors(document: object) -> None:
    from torchkeep.model.config import BundleConfig, validate_config

    try:
        config = validate_config(document, Path("config.json"))
    except tk.CorruptFileError as exc:
        message = str(exc)
    else:
        assert isinstance(config, BundleConfig)
        return
    assert "config.json" in message


def test_a_step_whose_manifest_mentions_a_bundle_is_still_a_step(tmp_path: Path, net: Net) -> None:
    manager = tk.CheckpointManager(tmp_path / "ckpt")
    manager.save(1, model=net, metrics={"torchkeep.bundle": 1.0})
    step = next((tmp_path / "ckpt").glob("step-*"))
    assert '"torchkeep.bundle"' in (step / MANIFEST_NAME).read_text()
    assert detect_format(step) == Format.CHECKPOINT_STEP
    report = tk.verify(step)
    assert report.format == Format.CHECKPOINT_STEP
    assert report.ok, report.problems


@pytest.mark.parametrize("aliases", [["torchkeep.models.Net"], "torchkeep.models.Net", 5])
def test_aliases_that_are_not_a_mapping_are_a_typed_error(
    aliases: Any, tmp_path: Path, net: Net
) -> None:
    bundle = tk.save_model(net, tmp_path / "net")
    with pytest.raises(tk.ModelClassNotFoundError, match="must be a mapping"):
        tk.load_model(bundle, aliases=aliases)
