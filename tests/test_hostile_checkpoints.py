"""Hostile checkpoint documents and damaged steps: skipped like corruption, never a raw error.

Every payload is first shown to break a plain reader (``json.loads`` and the naive use of the
fields it returns, the folder-name sort, ``\\d`` step names, plain ``safetensors``) in a child
process, then torchkeep is run on the same folder: the bad step is skipped with a warning by
``steps``/``latest_step``/``restore``/retention, reported by ``verify``/``ls``/``inspect``, and the
refusal is torchkeep's own schema gate (:class:`InvalidDocumentError`), not a raw exception.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchkeep as tk
from tests._live import prove_live
from tests.conftest import assert_state_equal
from torchkeep.checkpoint import import_torch_checkpoint
from torchkeep.checkpoint.layout import parse_step
from torchkeep.checkpoint.reader import read_step
from torchkeep.cli import main
from torchkeep.errors import InvalidDocumentError, UnreadableFileError
from torchkeep.hashing import hash_file
from torchkeep.models import Net
from torchkeep.schema import Limits, parse_json_document

SCHEMA_GATE = "is not a valid document"
DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _folder(tmp_path: Path, steps: tuple[int, ...] = (1, 2)) -> tuple[Path, dict[int, Any]]:
    """A checkpoint folder with one step per entry of ``steps``, each with its own weights."""
    directory = tmp_path / "ckpt"
    mgr = tk.CheckpointManager(directory, keep_last=None)
    states = {}
    for step in steps:
        model = _model(step)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        mgr.save(step, model=model, optimizer=opt, metrics={"loss": 1.0 / (step + 1)}, epoch=step)
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return directory, states


def _rewrite(step_dir: Path, name: str, text: str) -> None:
    """Replace ``name`` in ``step_dir``; for anything but the manifest, re-record its hash so
    that only the schema gate, not the hash, can catch the payload (an attacker's rewrite)."""
    (step_dir / name).write_text(text)
    if name == "manifest.json":
        return
    manifest = json.loads((step_dir / "manifest.json").read_text())
    size, digest = hash_file(step_dir / name)
    manifest["files"][name] = {"size": size, "hash": digest}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _naive(reads: str, canary: Path) -> str:
    """A plain reader: fires (creates ``canary``) when the naive code raises a raw error."""
    body = "\n".join("    " + line for line in reads.strip().splitlines())
    return (
        "import datetime, json, math, random, pathlib, sys\n"
        "sys.setrecursionlimit(1000)\n"
        "try:\n" + body + "\n"
        "except (ValueError, TypeError, KeyError, AttributeError, RecursionError,"
        " OverflowError, IndexError, AssertionError):\n"
        f"    pathlib.Path({str(canary)!r}).touch()\n"
    )


NAIVE_MANIFEST = """
m = json.loads(open({path}, 'rb').read())
datetime.datetime.fromtimestamp(m['created'])
'step-%08d' % m['step']
sum(r['size'] for r in m['files'].values()) + 0
[float(v) + 0 for v in m.get('metrics', dict()).values()]
'%s' % m['files']['model.safetensors']['hash'].lower()
m['format_version'] <= 1
"""

NAIVE_STATE = """
s = json.loads(open({path}, 'rb').read())
for name, e in s['entries'].items():
    assert e['kind'] in ('stateful', 'value'), e['kind']
    if e['file'] is not None:
        assert '/' not in e['file'], e['file']
    int(s['step']) + 0
"""

NAIVE_RNG = """
s = json.loads(open({path}, 'rb').read())
py = s['entries']['torchkeep.rng']['value']['python']['$tuple']
random.setstate((py[0], tuple(py[1]['$tuple']), py[2]))
"""


def _manifest_with(**changes: Any) -> Callable[[dict[str, Any]], Any]:
    def mutate(manifest: dict[str, Any]) -> Any:
        for path, value in changes.items():
            target = manifest
            *parents, last = path.split("__")
            for key in parents:
                target = target[key]
            target[last] = value
        return manifest

    return mutate


MANIFEST_PAYLOADS: dict[str, Callable[[dict[str, Any]], str]] = {
    "created is a word": lambda m: json.dumps(_manifest_with(created="yesterday")(m)),
    "created is NaN": lambda m: json.dumps(_manifest_with(created=math.nan)(m)),
    "created is huge": lambda m: json.dumps(m).replace(
        f'"created": {m["created"]!r}', f'"created": {HUGE}'
    ),
    "manifest is a list": lambda m: json.dumps([m]),
    "file record size is text": lambda m: json.dumps(m).replace(
        f'"size": {m["files"]["model.safetensors"]["size"]}',
        f'"size": "{m["files"]["model.safetensors"]["size"]}"',
    ),
    "step is a 5000-digit int": lambda m: json.dumps(m).replace(
        f'"step": {m["step"]}', f'"step": {HUGE}'
    ),
    "100k-deep nesting": lambda m: json.dumps(m)[:-1] + f', "extra": {DEEP}}}',
    "metric is text": lambda m: json.dumps(_manifest_with(metrics={"loss": "low"})(m)),
    "files is a list": lambda m: json.dumps(_manifest_with(files=[])(m)),
    "format version is text": lambda m: json.dumps(_manifest_with(format_version="1")(m)),
    "hash is a number": lambda m: json.dumps(m).replace(
        f'"hash": "{m["files"]["model.safetensors"]["hash"]}"', '"hash": 7'
    ),
}


def _assert_skipped_everywhere(
    directory: Path,
    states: dict[int, Any],
    capsys: pytest.CaptureFixture[str],
    *,
    listed: bool,
    weights_step: int = 1,
) -> None:
    """Step 2 is invalid: every reader uses step 1 and reports step 2, never a raw error.

    ``listed``: its manifest is valid, so it is listed like a step with a corrupt file.
    ``weights_step``: the step ``load_state_dict`` reads (2 when only a part it does not read,
    the random generator states, is malformed).
    """
    mgr = tk.CheckpointManager(directory, keep_last=None)
    assert mgr.steps == ([1, 2] if listed else [1])
    assert mgr.latest_step == (2 if listed else 1)
    model = _model(99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = mgr.restore(model=model)
    assert restored.step == 1
    assert_state_equal(model.state_dict(), states[1])
    assert any("step-00000002" in str(w.message) or "step 2" in str(w.message) for w in caught)
    assert_state_equal(tk.load_state_dict(directory), states[weights_step])

    report = tk.verify(directory)
    assert not report.ok
    assert report.checked[directory / "step-00000001"] == []
    assert report.checked[directory / "step-00000002"]

    capsys.readouterr()
    assert main(["ls", str(directory)]) == 0
    assert main(["ls", "--json", str(directory)]) == 0
    assert main(["inspect", str(directory)]) == 0
    assert main(["verify", str(directory)]) == 1
    assert main(["verify", str(directory / "step-00000002")]) == 1
    assert main(["inspect", str(directory / "step-00000002")]) in (0, 2)  # 0: the RNG payload
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err

    retained = tk.CheckpointManager(directory, keep_last=1, save_rng=False)
    retained.save(3, model=_model(3))
    retained.wait()
    assert retained.steps[-1] == 3
    assert retained.restore(model=_model(5)).step == 3


@pytest.mark.parametrize("payload", sorted(MANIFEST_PAYLOADS))
def test_hostile_manifest_is_skipped_like_a_corrupt_step(
    tmp_path: Path, payload: str, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, states = _folder(tmp_path)
    step_dir = directory / "step-00000002"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    _rewrite(step_dir, "manifest.json", MANIFEST_PAYLOADS[payload](manifest))
    canary = tmp_path / "canary"
    prove_live(_naive(NAIVE_MANIFEST, canary), canary, path=step_dir / "manifest.json")

    with pytest.raises(InvalidDocumentError, match=SCHEMA_GATE):
        read_step(step_dir)
    _assert_skipped_everywhere(directory, states, capsys, listed=False)


def _state_with(mutate: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], str]:
    def payload(state: dict[str, Any]) -> str:
        mutate(state)
        return json.dumps(state)

    return payload


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(state: dict[str, Any]) -> None:
        target = state
        *parents, last = path.split("/")
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


STATE_PAYLOADS: dict[str, tuple[Callable[[dict[str, Any]], str], str]] = {
    "entries is a list": (_state_with(_set("entries", [])), NAIVE_STATE),
    "unknown kind": (_state_with(_set("entries/epoch/kind", 7)), NAIVE_STATE),
    "file escapes the step": (
        _state_with(_set("entries/model/file", "../../model.safetensors")),
        NAIVE_STATE,
    ),
    "step is text": (_state_with(_set("step", "two")), NAIVE_STATE),
    "value nested 100k deep": (
        lambda s: json.dumps(s).replace('"value": 2', f'"value": {DEEP}'),
        NAIVE_STATE.replace("int(s['step']) + 0", "json.dumps(e['value'])"),
    ),
    "value is a 5000-digit int": (
        lambda s: json.dumps(s).replace('"value": 2', f'"value": {HUGE}'),
        NAIVE_STATE,
    ),
    "NaN literal": (
        lambda s: json.dumps(s).replace('"value": 2', '"value": NaN'),
        NAIVE_STATE.replace("int(s['step']) + 0", "json.dumps(e['value'], allow_nan=False)"),
    ),
    "malformed rng entry": (
        _state_with(
            _set("entries/torchkeep.rng/value/python", {"$tuple": [3, {"$tuple": [1, 2]}, None]})
        ),
        NAIVE_RNG,
    ),
}


@pytest.mark.parametrize("payload", sorted(STATE_PAYLOADS))
@pytest.mark.filterwarnings("ignore:checkpoint step 2 is unusable:UserWarning")  # the skip
def test_hostile_state_is_skipped_like_a_corrupt_step(
    tmp_path: Path, payload: str, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, states = _folder(tmp_path)
    step_dir = directory / "step-00000002"
    make, naive = STATE_PAYLOADS[payload]
    _rewrite(step_dir, "state.json", make(json.loads((step_dir / "state.json").read_text())))
    canary = tmp_path / "canary"
    prove_live(_naive(naive, canary), canary, path=step_dir / "state.json")

    with pytest.raises(InvalidDocumentError, match=SCHEMA_GATE + "|random generator states"):
        read_step(step_dir)
    weights_step = 2 if payload == "malformed rng entry" else 1
    _assert_skipped_everywhere(directory, states, capsys, listed=True, weights_step=weights_step)


def test_a_newer_format_version_asks_for_an_upgrade(tmp_path: Path) -> None:
    directory, _ = _folder(tmp_path, steps=(1,))
    step_dir = directory / "step-00000001"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    _rewrite(step_dir, "manifest.json", json.dumps(_manifest_with(format_version=99)(manifest)))
    with pytest.raises(tk.FormatVersionError, match=r"format version 99.*upgrade to a torchkeep"):
        read_step(step_dir)
    assert tk.CheckpointManager(directory).steps == []


def test_nothing_valid_leaves_the_model_untouched(tmp_path: Path) -> None:
    directory, _ = _folder(tmp_path, steps=(1,))
    step_dir = directory / "step-00000001"
    bad_rng = _state_with(
        _set("entries/torchkeep.rng/value/python", {"$tuple": [3, {"$tuple": [1, 2]}, None]})
    )
    _rewrite(step_dir, "state.json", bad_rng(json.loads((step_dir / "state.json").read_text())))
    canary = tmp_path / "canary"
    prove_live(_naive(NAIVE_RNG, canary), canary, path=step_dir / "state.json")
    model = _model(42)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    python_rng = __import__("random").getstate()
    with (
        pytest.warns(UserWarning, match="random generator states"),
        pytest.raises(tk.CheckpointNotFoundError),
    ):
        tk.CheckpointManager(directory).restore(model=model)
    assert_state_equal(model.state_dict(), before)
    assert __import__("random").getstate() == python_rng


def _flip_proven_silent(
    target: Path, expected: dict[str, torch.Tensor], work: Path, *, offset: int, bit: int
) -> None:
    """Flip one bit of the safetensors file ``target`` and prove (with files in ``work``) that
    plain ``load_file`` then returns tensors that differ from ``expected`` without an error."""
    torch.save(expected, work / "expected.pt")
    data = bytearray(target.read_bytes())
    data[offset] ^= bit
    target.write_bytes(bytes(data))
    canary = work / "canary"
    prove_live(
        "import torch, pathlib\nfrom safetensors.torch import load_file\n"
        f"got = load_file({{path}})\nwant = torch.load({str(work / 'expected.pt')!r})\n"
        "if any(not torch.equal(got[k], want[k]) for k in want):\n"
        f"    pathlib.Path({str(canary)!r}).touch()\n",
        canary,
        path=target,
    )


def test_flipped_byte_in_latest_weights_falls_back(tmp_path: Path) -> None:
    directory, states = _folder(tmp_path)
    target = directory / "step-00000002" / "model.safetensors"
    _flip_proven_silent(target, states[2], tmp_path, offset=-3, bit=0x10)

    with pytest.warns(UserWarning, match="step 2 is unusable"):
        assert_state_equal(tk.load_state_dict(directory), states[1])
    model = _model(7)
    with pytest.warns(UserWarning, match="step 2 is unusable"):
        tk.load_weights(model, directory)
    assert_state_equal(model.state_dict(), states[1])
    with pytest.raises(tk.ChecksumMismatchError):  # the step itself, asked for by path
        tk.load_state_dict(directory / "step-00000002")

    first = directory / "step-00000001" / "model.safetensors"
    data = bytearray(first.read_bytes())
    data[-1] ^= 0x01
    first.write_bytes(bytes(data))
    with (
        pytest.warns(UserWarning, match="unusable"),
        pytest.raises(tk.ChecksumMismatchError, match="no step"),
    ):
        tk.load_state_dict(directory)


def test_flipped_byte_in_a_bundle_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = Net()
    bundle = tk.save_model(model, tmp_path / "net.bundle")
    target = bundle / "model.safetensors"
    _flip_proven_silent(target, model.state_dict(), tmp_path, offset=-2, bit=0x40)
    with pytest.raises(tk.ChecksumMismatchError):
        tk.load_state_dict(bundle)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tk.ChecksumMismatchError):
        tk.load_weights(model, bundle)
    assert_state_equal(model.state_dict(), before)


def test_latest_is_by_step_number_not_by_name(tmp_path: Path) -> None:
    directory, states = _folder(tmp_path, steps=(99_999_999, 100_000_000))
    canary = tmp_path / "canary"
    prove_live(
        "import os, pathlib\n"
        "if sorted(os.listdir({path}))[-1] == 'step-99999999':\n"
        f"    pathlib.Path({str(canary)!r}).touch()\n",
        canary,
        path=directory,
    )
    mgr = tk.CheckpointManager(directory)
    assert mgr.steps == [99_999_999, 100_000_000]
    assert mgr.latest_step == 100_000_000
    assert mgr.restore(model=_model(0)).step == 100_000_000
    assert_state_equal(tk.load_state_dict(directory), states[100_000_000])
    assert list(tk.verify(directory).checked)[-1].name == "step-100000000"


@pytest.mark.parametrize(
    "name", ["step-١٢٣٤٥٦٧٨", "step-０００００００３", "step-3", "step-000000003", "step-0000000३"]
)
def test_only_canonical_ascii_step_names_are_steps(tmp_path: Path, name: str) -> None:
    directory, states = _folder(tmp_path, steps=(1,))
    shutil.copytree(directory / "step-00000001", directory / name)
    canary = tmp_path / "canary"
    prove_live(
        "import re, pathlib\n"
        "m = re.fullmatch(r'step-(\\d+)', {path})\n"
        "if m and int(m.group(1)) >= 0:\n"
        f"    pathlib.Path({str(canary)!r}).touch()\n",
        canary,
        path=Path(name),
    )
    assert parse_step(name) is None
    assert tk.CheckpointManager(directory).steps == [1]
    assert_state_equal(tk.load_state_dict(directory), states[1])


def test_unreadable_latest_step_is_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, states = _folder(tmp_path)
    locked = directory / "step-00000002"
    real_open = open

    def guarded(file: Any, *args: Any, **kwargs: Any) -> Any:
        real = os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else ""
        if real.startswith(str(locked)) and not real.endswith("manifest.json"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded)
    with pytest.raises(UnreadableFileError, match="Permission denied"):
        read_step(locked)
    model = _model(9)
    with pytest.warns(UserWarning, match="cannot be read"):
        assert tk.CheckpointManager(directory).restore(model=model).step == 1
    assert_state_equal(model.state_dict(), states[1])
    with pytest.warns(UserWarning, match="cannot be read"):
        assert_state_equal(tk.load_state_dict(directory), states[1])
    assert any("cannot be read" in p for p in tk.verify(directory).problems)


def _deep(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def _cyclic() -> Any:
    value: list[Any] = []
    value.append(value)
    return value


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        pytest.param("big", 10**5000, "bits", id="5000-digit-int"),
        ("z", torch.zeros(2, dtype=torch.complex128), "complex128"),
        ("c", 1 + 2j, "complex"),
        pytest.param("deep", _deep(100_000), "nested more than", id="100k-deep"),
        pytest.param("loop", _cyclic(), "nested more than", id="cycle"),
        ("../evil", 1, "entry names"),
        ("torchkeep.rng", 1, "reserved"),
    ],
)
def test_unstorable_values_are_refused_before_writing(
    tmp_path: Path, name: str, value: Any, match: str
) -> None:
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    with pytest.raises(tk.UnsupportedValueError, match=match):
        mgr.save(1, model=_model(0), **{name: value})
    assert not (tmp_path / "ckpt").exists() or list((tmp_path / "ckpt").iterdir()) == []
    assert not (tmp_path / "evil.safetensors").exists()


def test_a_user_value_named_rng_is_kept_apart_from_the_generators(tmp_path: Path) -> None:
    import random

    mgr = tk.CheckpointManager(tmp_path)
    random.seed(5)
    mgr.save(1, model=_model(0), rng="my-seed-schedule", metrics_note="x")
    expected = random.random()
    random.seed(9)
    restored = mgr.restore(model=_model(1))
    assert restored.extra == {"rng": "my-seed-schedule", "metrics_note": "x"}
    assert random.random() == expected  # the generators were restored too
    mgr_plain = tk.CheckpointManager(tmp_path / "plain", save_rng=False)
    mgr_plain.save(1, rng=[1, 2])
    assert mgr_plain.restore().extra == {"rng": [1, 2]}


def test_convert_takes_tutorial_dicts_with_any_keys(tmp_path: Path) -> None:
    model = _model(0)
    torch.save(
        {
            "epoch": 4,
            "step": 1200,
            "metrics": {"acc": 0.5},
            "overwrite": True,
            "model": "resnet-ish",
            "model_state_dict": model.state_dict(),
            "loss": 0.3,
        },
        tmp_path / "old.pt",
    )
    step_dir = import_torch_checkpoint(tmp_path / "old.pt", tmp_path / "ckpt")
    assert step_dir.name == "step-00000004"
    fresh = _model(1)
    restored = tk.CheckpointManager(tmp_path / "ckpt").restore(model=fresh)
    assert restored.extra == {
        "epoch": 4,
        "step": 1200,
        "metrics": {"acc": 0.5},
        "overwrite": True,
        "model_value": "resnet-ish",
        "loss": 0.3,
    }
    assert_state_equal(fresh.state_dict(), model.state_dict())


# ------------------------------------------------------------------------------------------
# the parser's own bounds


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "deeper than", id="deep"),
        pytest.param(b'{"a": ' + HUGE.encode() + b"}", "digits", id="huge-int"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": -Infinity}', "Infinity"),
        (b'{"a": 1e400}', "infinity"),
        (b'{"a": 1, "a": 2}', "repeats the key"),
        (b"\xff\xfe{}", "UTF-8"),
        pytest.param(b'{"a": "' + b"x" * 300_000 + b'"}', "bytes", id="too-large"),
        (b'{"a": [1, 2', "not JSON"),
    ],
)
def test_parser_refuses_out_of_bounds_documents(document: bytes, problem: str) -> None:
    with pytest.raises(InvalidDocumentError, match=problem):
        parse_json_document(document, source="doc.json", limits=Limits(max_bytes=250_000))


def test_parser_accepts_brackets_inside_strings() -> None:
    text = json.dumps({"a": "[" * 500, "b": [[[1]]]}).encode()
    assert parse_json_document(text, source="x", limits=Limits(max_depth=4))["b"] == [[[1]]]


# ------------------------------------------------------------------------------------------
# property-based: arbitrary mutations of real documents


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
_EXTREME = st.sampled_from(
    [10**5000, math.nan, math.inf, "yesterday", [], {}, None, -1, 2**70, True, "../x", DEEP]
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value[:4]):
            paths += _paths(child, (*prefix, index))
    return paths


def _replace(document: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return document


def _dump(document: Any) -> str:
    """JSON text of ``document`` where the strings standing for a huge int and deep nesting
    are put back as the raw literals."""

    def placeholders(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: placeholders(child) for key, child in value.items()}
        if isinstance(value, list):
            return [placeholders(child) for child in value]
        return "<HUGE>" if value == 10**5000 else value

    text = json.dumps(placeholders(document), allow_nan=True)
    return text.replace('"<HUGE>"', HUGE).replace(f'"{DEEP}"', DEEP)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Any]]:
    return _folder(tmp_path_factory.mktemp("template"))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    document=st.sampled_from(["manifest.json", "state.json"]),
    choice=st.integers(min_value=0, max_value=10_000),
    new=_JSON | _EXTREME,
)
def test_fuzzed_documents_raise_only_typed_errors(
    template: tuple[Path, dict[int, Any]],
    tmp_path_factory: pytest.TempPathFactory,
    document: str,
    choice: int,
    new: Any,
) -> None:
    source, states = template
    directory = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(source, directory)
    step_dir = directory / "step-00000002"
    original = json.loads((step_dir / document).read_text())
    paths = _paths(original)
    mutated = _replace(json.loads(json.dumps(original)), paths[choice % len(paths)], new)
    _rewrite(step_dir, document, _dump(mutated))

    try:
        read_step(step_dir)
        intact = True
    except tk.TorchkeepError:
        intact = False
    mgr = tk.CheckpointManager(directory, keep_last=None)
    assert mgr.steps in ([1], [1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = mgr.restore()  # the generators too: a malformed state must not get here
        assert restored.step == (2 if intact else 1)
        weights = tk.load_state_dict(directory)
        assert any(torch.equal(weights["0.weight"], s["0.weight"]) for s in states.values())
        tk.verify(directory)
        assert main(["ls", str(directory)]) == 0
        assert main(["inspect", str(directory)]) in (0, 2)
    shutil.rmtree(directory.parent)


@pytest.mark.parametrize("numpy_state", [None, [], "MT19937"])
def test_a_malformed_numpy_generator_state_is_refused_before_any_generator_changes(
    tmp_path: Path, numpy_state: object
) -> None:
    """A step whose NumPy generator state is null (or another non-tuple) is skipped by the
    prechecks: restore falls back, and not even Python's or torch's generator is touched
    (a null once reached restore, which set both and then failed with a TypeError)."""
    directory, _ = _folder(tmp_path)
    step_dir = directory / "step-00000002"
    state = json.loads((step_dir / "state.json").read_text())
    assert "numpy" in state["entries"]["torchkeep.rng"]["value"]
    state["entries"]["torchkeep.rng"]["value"]["numpy"] = numpy_state
    _rewrite(step_dir, "state.json", json.dumps(state))
    mgr = tk.CheckpointManager(directory, keep_last=None)
    random.seed(123)
    torch.manual_seed(123)
    before = (random.getstate(), torch.get_rng_state().tolist())
    with pytest.raises(tk.InvalidDocumentError, match="'numpy' state"):
        mgr.restore(step=2)
    assert (random.getstate(), torch.get_rng_state().tolist()) == before
    with pytest.warns(UserWarning, match="step 2 is unusable"):
        assert mgr.restore().step == 1


@pytest.mark.parametrize(
    ("where", "read_time"),
    [
        ("a parameter id in a group", False),
        ("a list state key", True),
        ("a tuple state key", False),
    ],
)
def test_optimizer_parameter_ids_that_are_not_ids_are_refused_before_anything_changes(
    tmp_path: Path, where: str, read_time: bool
) -> None:
    """The fuzzer found a list among a group's saved parameter ids: the prechecks used it as a
    dictionary key and raised a TypeError. Ids are integers or names; anything else is a
    damaged document, refused with nothing live changed: a key that cannot even be a dict key
    when the step is read (the latest-step restore then falls back), the others when the
    optimizer entry is checked (the restore raises, naming the step)."""
    directory, states = _folder(tmp_path)
    step_dir = directory / "step-00000002"
    state = json.loads((step_dir / "state.json").read_text())
    optimizer = state["entries"]["optimizer"]["value"]
    if where == "a parameter id in a group":
        optimizer["param_groups"][0]["params"][0] = [0]
    elif where == "a list state key":
        optimizer["state"]["$dict"][0][0] = [0]
    else:
        optimizer["state"]["$dict"][0][0] = {"$tuple": [0, 1]}
    _rewrite(step_dir, "state.json", json.dumps(state))
    model = _model(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    def untouched() -> None:
        assert_state_equal(model.state_dict(), weights)
        for param, before in zip(model.parameters(), buffers, strict=True):
            assert torch.equal(opt.state[param]["momentum_buffer"], before)

    mgr = tk.CheckpointManager(directory, keep_last=None)
    problem = r"bad \$dict entry" if read_time else "numbers a parameter with a"
    with pytest.raises(tk.CorruptFileError, match=problem):
        mgr.restore(step=2, model=model, optimizer=opt)
    untouched()
    if read_time:
        with pytest.warns(UserWarning, match="step 2 is unusable"):
            assert mgr.restore(model=model, optimizer=opt).step == 1
        assert_state_equal(model.state_dict(), states[1])
    else:
        with pytest.raises(tk.InvalidDocumentError, match=r"step-00000002.*restore another step"):
            mgr.restore(model=model, optimizer=opt)
        untouched()


def test_entries_a_step_does_not_list_are_reported_by_verify(tmp_path: Path) -> None:
    directory, states = _folder(tmp_path)
    step = directory / "step-00000002"
    assert tk.verify(directory).ok
    (step / "evil.py").write_text("open('pwned', 'w')\n")
    (step / "extra").mkdir()
    problems = tk.verify(directory).problems
    assert len(problems) == 2
    assert all("not listed in the manifest" in p for p in problems)
    assert any("evil.py" in p for p in problems)
    assert any("extra" in p for p in problems)
    assert not tk.verify(directory / "step-00000001").problems
    model = _model(9)  # never read, so a restore still uses the step's own files
    assert tk.CheckpointManager(directory).restore(model=model).step == 2
    assert_state_equal(model.state_dict(), states[2])
