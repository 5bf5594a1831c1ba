"""Hostile ``.pt2`` programs: every field torch turns into code, every way to hide a pickle.

Each hostile archive is a real ``torch.export.save`` with members edited. Its payload is first
proven live under the plain loader (``torch.export.load(...).module()``, called once where the
payload only fires on a call); then ``tk.scan`` must report it, ``tk.load_model(...,
trust_program=True)`` must refuse with torchkeep's own error, and the canary must stay absent.
"""

from __future__ import annotations

import copyreg
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._export.serde.schema import SCHEMA_VERSION

import torchkeep as tk
from tests._compat import skip_unless_programs_load
from torchkeep.models import Net
from torchkeep.security.programs import is_plain_expression, is_plain_guard, is_plain_treespec
from torchkeep.security.walker import Source, WalkResult, walk_source

from ._live import EXPORT_LOAD, prove_live

Members = list[tuple[str, bytes]]
# The plain loader, then one call of the module (guards and generated code run on a call).
EXPORT_CALL = EXPORT_LOAD + "(torch.randn(2, 4))"


class Tiny(nn.Module):
    """A linear layer and a buffer: weights, a buffer and a dynamic batch in the program."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 3)
        self.register_buffer("b", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x) + self.b


class Derived(nn.Module):
    """Derived and constrained dimensions: the program carries guards and sympy expressions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.k = torch.tensor([1.0, 2.0])  # a lifted tensor constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(1)
        return h.view(h.shape[0] // 2, -1, 2).sum(-1) * self.k.sum()


class Keywords(nn.Module):
    """Keyword inputs and two dynamic dimensions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.embed(ids).mean(1) * scale


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean program of :class:`Tiny`, batch dynamic in [1, 64] (the tests that use it build
    hostile programs in the layout of an examined torch's loader and prove them live there)."""
    skip_unless_programs_load()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("program") / "tiny.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Tiny(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def _rebuild(source: Path, target: Path, edit: Callable[[Members], Members]) -> Path:
    with zipfile.ZipFile(source) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in edit(members):
            archive.writestr(name, data)
    return target


def _edit_json(suffix: str, change: Callable[[dict], object]) -> Callable[[Members], Members]:
    """An edit that rewrites the JSON member ending in ``suffix`` with ``change``."""

    def edit(members: Members) -> Members:
        out = []
        for name, data in members:
            if name.endswith(suffix):
                document = json.loads(data)
                change(document)
                data = json.dumps(document).encode()
            out.append((name, data))
        return out

    return edit


def _protocol0(canary: Path) -> bytes:
    """A protocol-0 pickle (first byte ``c``, not 0x80) that creates ``canary``."""
    return f"cos\nsystem\n(S'touch {canary}'\ntR.".encode()


def _shell(canary: Path) -> str:
    return f"__import__('os').system('touch {canary}')"


# --- the hostile variants: each builds an archive from the clean one -----------------------


def _guards_code(clean: Path, target: Path, canary: Path) -> Path:
    def change(program: dict) -> None:
        program["guards_code"] = [f"{_shell(canary)} == 0"]

    return _rebuild(clean, target, _edit_json("models/model.json", change))


def _padded_program(clean: Path, target: Path, canary: Path) -> Path:
    """The hostile program behind 1 MiB of JSON whitespace (json.loads skips it)."""
    hostile = _guards_code(clean, target.with_suffix(".plain.pt2"), canary)
    padding = b" \n\t\r" * (1 << 18)
    return _rebuild(
        hostile,
        target,
        lambda members: [
            (n, padding + d if n.endswith("models/model.json") else d) for n, d in members
        ],
    )


def _sympy_expression(clean: Path, target: Path, canary: Path) -> Path:
    def change(program: dict) -> None:
        size = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
        size["as_expr"]["expr_str"] += f" + {_shell(canary)}"

    return _rebuild(clean, target, _edit_json("models/model.json", change))


def _named_metadata(clean: Path, target: Path, canary: Path) -> Path:
    """The input renamed ``metadata`` (a key whose strings are free text), a payload below it."""

    def edit(members: Members) -> Members:
        def change(program: dict) -> None:
            size = program["graph_module"]["graph"]["tensor_values"]["metadata"]["sizes"][0]
            size["as_expr"]["expr_str"] += f" + {_shell(canary)}"

        renamed = [
            (n, d.replace(b'"x"', b'"metadata"') if n.endswith("models/model.json") else d)
            for n, d in members
        ]
        return _edit_json("models/model.json", change)(renamed)

    return _rebuild(clean, target, edit)


def _placeholder_name(clean: Path, target: Path, canary: Path) -> Path:
    """The input's name lands in ``def forward(self, <name>)`` that FX generates and execs."""
    name = json.dumps(f"x={_shell(canary)}")

    def edit(members: Members) -> Members:
        return [
            (n, d.replace(b'"x"', name.encode()) if n.endswith("models/model.json") else d)
            for n, d in members
        ]

    return _rebuild(clean, target, edit)


def _parameter_name(clean: Path, target: Path, canary: Path) -> Path:
    """A parameter name lands in ``getattr(self.l, "<name>")`` in the generated forward."""
    code = ",".join(str(c) for c in f"import os; os.system('touch {canary}')".encode())
    name = json.dumps(f'l.bias" if exec(str(bytes(({code},)), "latin1")) else "bias').encode()

    def edit(members: Members) -> Members:
        return [(n, d.replace(b'"l.bias"', name)) for n, d in members]

    return _rebuild(clean, target, edit)


def _pickled_weight(clean: Path, target: Path, canary: Path) -> Path:
    def edit(members: Members) -> Members:
        def change(config: dict) -> None:
            config["config"]["l.weight"]["use_pickle"] = True

        members = _edit_json("model_weights_config.json", change)(members)
        return [(n, _protocol0(canary) if n.endswith("weight_0") else d) for n, d in members]

    return _rebuild(clean, target, edit)


def _constant(prefix: str) -> Callable[[Path, Path, Path], Path]:
    """A constant ``<prefix>0`` marked ``use_pickle``; torch loads every configured constant."""

    def build(clean: Path, target: Path, canary: Path) -> Path:
        def edit(members: Members) -> Members:
            def change(config: dict) -> None:
                config["config"]["k"] = {
                    "path_name": f"{prefix}0",
                    "is_param": False,
                    "use_pickle": True,
                    "tensor_meta": None,
                }

            members = _edit_json("model_constants_config.json", change)(members)
            root = members[0][0].split("/")[0]
            return [*members, (f"{root}/data/constants/{prefix}0", _protocol0(canary))]

        return _rebuild(clean, target, edit)

    return build


def _storage_claimed_weight(clean: Path, target: Path, canary: Path) -> Path:
    """A pickled weight ``data/weights/0`` that a decoy ``data/weights.pkl`` declares as its
    storage record (of the right size): a storage exemption must not reach what torch unpickles.
    """
    payload = _protocol0(canary)

    class Decoy(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", torch.ByteStorage, "0", "cpu", len(payload)) if obj == 0 else None

    decoy = io.BytesIO()
    Decoy(decoy, protocol=2).dump(0)

    def edit(members: Members) -> Members:
        def change(config: dict) -> None:
            config["config"]["l.weight"].update(use_pickle=True, path_name="0")

        members = _edit_json("model_weights_config.json", change)(members)
        root = members[0][0].split("/")[0]
        extra = [
            (f"{root}/data/weights.pkl", decoy.getvalue()),
            (f"{root}/data/weights/0", payload),
        ]
        return [*members, *extra]

    return _rebuild(clean, target, edit)


def _sample_inputs(clean: Path, target: Path, canary: Path) -> Path:
    """torch retries the sample inputs with ``weights_only=False`` after a weights-only failure."""
    return _rebuild(
        clean,
        target,
        lambda members: [
            (n, _protocol0(canary) if "sample_inputs/" in n else d) for n, d in members
        ],
    )


def _raw_declaration(tensor_constant: Path, target: Path, canary: Path) -> Path:
    """The payload, plus a config torch never reads that declares the payload raw bytes."""
    decoy = {"config": {"k": {"path_name": "tensor_0", "is_param": False, "use_pickle": False}}}

    def edit(members: Members) -> Members:
        root = members[0][0].split("/")[0]
        return [*members, (f"{root}/data/constants/decoy_config.json", json.dumps(decoy).encode())]

    return _rebuild(tensor_constant, target, edit)


def _duplicate_config(tensor_constant: Path, target: Path, canary: Path) -> Path:
    """A second constants config with the same name: torch reads the first, zipfile the last."""
    raw = {"config": {"k": {"path_name": "tensor_0", "is_param": False, "use_pickle": False}}}

    def edit(members: Members) -> Members:
        out = []
        for name, data in members:
            out.append((name, data))
            if name.endswith("model_constants_config.json"):
                out.append((name, json.dumps(raw).encode()))
        return out

    with pytest.warns(UserWarning, match="Duplicate name"):
        return _rebuild(tensor_constant, target, edit)


def _case_duplicate_config(clean: Path, target: Path, canary: Path) -> Path:
    """The real constants config is clean; ``MODEL_constants_config.json`` before it adds a
    pickled constant, and torch's reader (which looks names up ignoring case) reads that one."""
    hostile = _constant("tensor_")(clean, target.with_suffix(".plain.pt2"), canary)
    clean_config = _member(clean, "model_constants_config.json")

    def edit(members: Members) -> Members:
        out: Members = []
        for name, data in members:
            if name.endswith("model_constants_config.json"):
                out.append((name.replace("/model_", "/MODEL_"), data))
                data = clean_config
            out.append((name, data))
        return out

    return _rebuild(hostile, target, edit)


def _duplicate_program(clean: Path, target: Path, canary: Path) -> Path:
    """Two ``models/model.json``; which copy torch reads depends on miniz's lookup (here the
    hostile second one, while for the constants config above it is the first)."""
    hostile = _guards_code(clean, target.with_suffix(".first.pt2"), canary)
    with zipfile.ZipFile(hostile) as archive:
        first = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        program = archive.read(first)

    def edit(members: Members) -> Members:
        out: Members = []
        for name, data in members:
            out.append((name, data))
            if name == first:
                out.append((name, program))
        return out

    with pytest.warns(UserWarning, match="Duplicate name"):
        return _rebuild(clean, target, edit)


def _is_global(name: str) -> Callable[[tk.security.Finding], bool]:
    return lambda finding: finding.name == name


def _reason(text: str) -> Callable[[tk.security.Finding], bool]:
    return lambda finding: text in finding.reason


_PICKLE = _is_global("os.system")
_NAME = _reason("a name FX pastes into generated code")
_DUPLICATE = _reason("entries named")
_GUARD = _reason("a guard .module() execs")

# id: (builder, plain loader, findings that must all be reported)
VARIANTS: dict[str, tuple[Callable[[Path, Path, Path], Path], str, list[Callable[..., bool]]]] = {
    "guards_code": (_guards_code, EXPORT_CALL, [_GUARD]),
    "named_metadata": (_named_metadata, EXPORT_LOAD, [_reason("sympify evaluates it")]),
    "padded_program": (_padded_program, EXPORT_CALL, [_GUARD]),
    "sympy_expression": (_sympy_expression, EXPORT_LOAD, [_reason("sympify evaluates it")]),
    "placeholder_name": (_placeholder_name, EXPORT_LOAD, [_NAME]),
    "parameter_name": (_parameter_name, EXPORT_CALL, [_NAME]),
    "pickled_weight": (_pickled_weight, EXPORT_LOAD, [_PICKLE]),
    "tensor_constant": (_constant("tensor_"), EXPORT_LOAD, [_PICKLE]),
    "opaque_constant": (_constant("opaque_obj_"), EXPORT_LOAD, [_PICKLE]),
    "sample_inputs": (_sample_inputs, EXPORT_LOAD, [_PICKLE]),
    "storage_claimed_weight": (_storage_claimed_weight, EXPORT_LOAD, [_PICKLE]),
    "case_duplicate_config": (_case_duplicate_config, EXPORT_LOAD, [_PICKLE, _DUPLICATE]),
    "duplicate_program": (_duplicate_program, EXPORT_CALL, [_DUPLICATE, _GUARD]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hostile_program_is_refused(clean: Path, tmp_path: Path, variant: str) -> None:
    build, loader, expected = VARIANTS[variant]
    canary = tmp_path / "canary"
    hostile = build(clean, tmp_path / f"{variant}.pt2", canary)
    prove_live(loader, canary, path=hostile)

    _assert_refused(hostile, canary, expected)


@pytest.mark.parametrize("declare", [_raw_declaration, _duplicate_config])
def test_config_declaring_a_pickle_raw_hides_nothing(
    clean: Path, tmp_path: Path, declare: Callable[[Path, Path, Path], Path]
) -> None:
    canary = tmp_path / "canary"
    payload = _constant("tensor_")(clean, tmp_path / "payload.pt2", canary)
    hostile = declare(payload, tmp_path / "hostile.pt2", canary)
    prove_live(EXPORT_LOAD, canary, path=hostile)

    expected = [_PICKLE, _DUPLICATE] if declare is _duplicate_config else [_PICKLE]
    _assert_refused(hostile, canary, expected)


def test_legacy_program_format_is_scanned(clean: Path, tmp_path: Path) -> None:
    """torch.export.load falls back to the torch 2.7 zip layout when the archive is no PT2
    package; that path unpickles ``serialized_state_dict.pt`` after a failed weights-only try."""
    canary = tmp_path / "canary"
    hostile = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(hostile, "w") as archive:
        archive.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        archive.writestr("serialized_exported_program.json", _member(clean, "models/model.json"))
        archive.writestr("serialized_state_dict.pt", _protocol0(canary))
        archive.writestr("serialized_constants.pt", b"")
        archive.writestr("serialized_example_inputs.pt", b"")
    prove_live(EXPORT_LOAD, canary, path=hostile)

    assert any(_PICKLE(f) for f in tk.scan(hostile).dangerous)
    with pytest.raises(tk.TorchkeepError):
        tk.load_model(hostile, trust_program=True)
    assert not canary.exists()


def _assert_refused(hostile: Path, canary: Path, expected: list[Callable[..., bool]]) -> None:
    report = tk.scan(hostile)
    assert not report.is_safe
    for matches in expected:
        assert any(matches(f) for f in report.dangerous), report.to_json()["findings"]
    with pytest.raises(tk.UnsafeCheckpointError, match="refused even with trust_program=True"):
        tk.load_model(hostile, trust_program=True)
    assert not canary.exists()


def _export(model: nn.Module, args: tuple, shapes: object, path: Path, **kw: object) -> nn.Module:
    program = torch.export.export(model.eval(), args, kwargs=kw or None, dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return program.module()


def test_clean_programs_scan_clean_and_load(tmp_path: Path) -> None:
    skip_unless_programs_load()
    torch.manual_seed(0)
    dim = torch.export.Dim
    half = dim("half", min=1, max=100)
    cases = [
        (Tiny(), (torch.randn(2, 4),), ({0: dim("batch", min=1, max=64)},), {}),
        (Net(), (torch.randn(2, 3, 32, 32),), ({0: dim("batch", min=1)},), {}),
        (
            nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),  # names like "0.weight"
            (torch.randn(3, 4),),
            ({0: dim("rows")},),
            {},
        ),
        (Derived(), (torch.randn(4, 3, 9, 9),), ({0: 2 * half, 2: dim("h", min=5)},), {}),
        (
            Keywords(),
            (torch.randint(0, 10, (3, 7)),),
            ({0: dim("n"), 1: dim("t")}, None),
            {"scale": 2.0},
        ),
    ]
    for index, (model, args, shapes, kwargs) in enumerate(cases):
        path = tmp_path / f"clean{index}.pt2"
        expected = _export(model, args, shapes, path, **kwargs)
        report = tk.scan(path)
        assert report.is_safe, (type(model).__name__, report.to_json()["findings"])
        loaded = tk.load_model(path, trust_program=True)
        assert torch.equal(loaded(*args, **kwargs), expected(*args, **kwargs))
    guards = json.loads(_member(tmp_path / "clean3.pt2", "models/model.json"))["guards_code"]
    assert guards, "the derived-dimension program should carry guards for the whitelist to pass"


def test_program_torch_cannot_load_is_a_typed_error(clean: Path, tmp_path: Path) -> None:
    def change(program: dict) -> None:
        program["verifiers"] = ["NO_SUCH_DIALECT"]  # plain data, but torch raises KeyError

    broken = _rebuild(clean, tmp_path / "broken.pt2", _edit_json("models/model.json", change))
    assert tk.scan(broken).is_safe
    skip_unless_programs_load()
    with pytest.raises(tk.CorruptFileError, match=r"broken\.pt2 passed the scan but"):
        tk.load_model(broken, trust_program=True)


def _member(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith(suffix)))


@pytest.mark.parametrize(
    "text",
    [
        "Symbol('s77', positive=True, integer=True)",
        "Max(Integer(1), Add(Symbol('s0', positive=True, integer=True), Integer(-2)))",
        "Mod(Symbol('s53', integer=True), Integer(3))",
        "FloorDiv(s0, 2) + u1*3 - 1 >= 0",
        "Pow(Integer(2), Integer(64))",
        "Float('1.5', precision=53)",
    ],
)
def test_plain_expressions_pass(text: str) -> None:
    assert is_plain_expression(text)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('id')",
        "Symbol('s0').__class__",
        "Symbol('s0; x', integer=True)",
        "(lambda: 1)()",
        "Pow(Integer(10), Integer(10**18))",
        "Integer(10) ** Integer(99999999)",
        "Pow(Symbol('s0', integer=True), Integer(10**6))",
        "2 ** s0",
        "LShift(1, s0)",
        "Pow(Pow(s0, 64), 64)",
        "Function('f')(s0)",
        "S.Half",
        "s0 ^ 2",
        "[s0]",
        "f'{s0}'",
    ],
)
def test_hostile_expressions_fail(text: str) -> None:
    assert not is_plain_expression(text)


def test_guard_whitelist() -> None:
    assert is_plain_guard("(-1) + 2*L['a'].size()[0] <= L['b'].size()[0] + L['a'].size()[0]")
    assert is_plain_guard("max(1, L['x'].size()[2] // 2) == L['x'].stride()[0] and L['n'] == 3")
    for hostile in [
        "L['x'].size()[0] == 2 or __import__('os').system('id')",
        "L['x'].__class__",
        "L['x'].size(0) == getattr(L, 'y')",
        "L['x\"'].size()[0] == 1",
        "math.system(1)",
        "L['x'].size()[0] ** 10 ** 10",
    ]:
        assert not is_plain_guard(hostile), hostile


def test_treespec_whitelist() -> None:
    plain = '[1, {"type": "builtins.dict", "context": "[\\"scale\\"]", "children_spec": []}]'
    assert is_plain_treespec(plain)
    hostile = plain.replace("scale", "scale':__import__('os').system('id'),'z")
    assert not is_plain_treespec(hostile)


def _walk(data: bytes) -> WalkResult:
    """One walk, as the scanner walks every archive member."""
    return walk_source(Source(io.BytesIO(data)))


class _Shell:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("true",))


def test_raw_tensor_records_walked_as_pickles_give_no_events() -> None:
    """Every member is walked as a pickle, raw weights too: random floats and ints must end
    where the unpickler would fail, not as invented imports (which would refuse clean programs).
    """
    generator = torch.Generator().manual_seed(0)
    for index in range(3000):
        scale = (0.02, 1.0, 10.0)[index % 3]
        values = torch.randn(64, generator=generator) * scale
        if index % 4 == 0:
            values = torch.randint(-5, 5, (64,), generator=generator)
        result = _walk(values.numpy().tobytes())
        assert not result.events, (index, result.events)


@pytest.mark.parametrize(
    "payload",
    [
        *[pickle.dumps(_Shell(), protocol=p) for p in range(6)],
        b"(0cos\nsystem\n(S'true'\ntR.",  # MARK, POP (drops the MARK), then the payload
        pickle.dumps(_Shell(), protocol=2) + bytes(range(256)),  # payload, then garbage
        b"cos\nsystem\n(S'true'\ntR" + b"\xff",  # runs, then fails
        # text numbers pickletools rejects but the C unpickler reads (strtol base 0), then POP
        b"L0x10L\n0cos\nsystem\n(S'true'\ntR.",
        b"I0x10\n0cos\nsystem\n(S'true'\ntR.",
        b"S'\\q'\n0cos\nsystem\n(S'true'\ntR.",
    ],
)
def test_precise_walk_still_reports_every_payload(payload: bytes) -> None:
    result = _walk(payload)
    assert {e.target.full_name for e in result.events if e.target} & {"os.system", "posix.system"}


def test_precise_walk_resolves_registered_extension_codes() -> None:
    payload = b"\x80\x02\x83\xff\x7fX\x04\x00\x00\x00true\x85R."  # EXT2 0x7fff, call
    copyreg.add_extension("os", "system", 0x7FFF)
    try:
        result = _walk(payload)
    finally:
        copyreg.remove_extension("os", "system", 0x7FFF)
    assert [e.target.full_name for e in result.events if e.target] == ["os.system", "os.system"]
    # Unregistered here, a loader here raises at EXT2; another process may have registered it,
    # so a complete pickle is reported, while raw bytes that stop before STOP report nothing.
    unregistered = _walk(payload)
    assert unregistered.complete
    assert {e.kind for e in unregistered.events} == {"unresolved"}
    truncated = _walk(payload[:-1])
    assert not truncated.events
    assert not truncated.complete
