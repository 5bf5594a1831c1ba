"""Hostile torch zips: damaged tensor records, zip bombs, pickles hidden in any member.

Every attack is first shown to work against the plain loader in the same test (torch's own
memory-mapped read accepting a record of the wrong size, a pickle the plain loader runs), then
torchkeep is run on the same file and must refuse it through its own gate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import pickle
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests._compat import plain_load_checks_record_sizes, skip_unless_programs_load
from tests._live import EXPORT_LOAD, PICKLE_LOAD, TORCH_LOAD, prove_live
from torchkeep.cli import main
from torchkeep.describe import describe
from torchkeep.security.policy import LIMITS

MiB = 1 << 20
# Peak Python allocations allowed while refusing or scanning a bomb that expands to far more.
_BOUND = 32 * MiB


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _write_zip(
    path: Path, members: dict[str, bytes], *, deflated: Callable[[str], bool] = lambda n: False
) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            method = zipfile.ZIP_DEFLATED if deflated(name) else zipfile.ZIP_STORED
            archive.writestr(name, data, compress_type=method)
    return path


def _record(members: dict[str, bytes], key: str = "0") -> str:
    return next(n for n in members if n.endswith(f"/data/{key}"))


def _plain_mmap_load(path: Path) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = torch.load(path, weights_only=True, mmap=True)
    return loaded


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("head", torch.zeros(10))


# --- class 3: every record is checked against the storage its pickle declares --------------


def _view_file(tmp_path: Path, stop: int = 10) -> tuple[Path, torch.Tensor]:
    """A torch.save file whose only tensor is a view of a 1000-element float storage."""
    storage = torch.arange(1000.0)
    path = tmp_path / "view.pt"
    torch.save({"head": storage[:stop]}, path)
    return path, storage[:stop].clone()


@pytest.mark.parametrize(
    ("case", "stop", "edit"),
    [
        ("short", 10, lambda data: data[:40]),  # covers the view, not the storage
        ("empty", 0, lambda data: b""),  # an empty view of a storage whose bytes are gone
        ("long", 10, lambda data: bytes(8) + data),  # shifted: the view reads other bytes
    ],
)
def test_record_of_the_wrong_size_is_refused(
    tmp_path: Path, case: str, stop: int, edit: Callable[[bytes], bytes]
) -> None:
    good, expected = _view_file(tmp_path, stop)
    members = _members(good)
    record = _record(members)
    members[record] = edit(members[record])
    path = _write_zip(tmp_path / f"{case}.pt", members)

    # the hole: torch's memory-mapped read does not compare the record with the storage
    if plain_load_checks_record_sizes():  # torch 2.4's read without mmap does not either
        with pytest.raises(RuntimeError, match="does not match expected size"):
            torch.load(path, weights_only=True)  # the read without mmap does, for reference
    plain = _plain_mmap_load(path)["head"]
    if case == "long":
        assert not torch.equal(plain, expected), "the shifted record should load garbage"
    else:
        assert torch.equal(plain, expected)  # loaded silently from a damaged file

    for read in (lambda: tk.load_state_dict(path), lambda: tk.load_weights(_Pair(), path)):
        with pytest.raises(tk.CorruptFileError) as info:
            read()
        message = str(info.value)
        assert str(path) in message
        assert record in message
        assert f"holds {len(members[record])} bytes" in message
        assert "declares 4000 bytes" in message
    assert tk.scan(path).problems


def test_compressed_record_is_refused(tmp_path: Path) -> None:
    good, _ = _view_file(tmp_path)
    members = _members(good)
    record = _record(members)
    path = _write_zip(tmp_path / "deflated.pt", members, deflated=lambda n: n == record)
    good_values = _plain_mmap_load(good)["head"]
    plain = _plain_mmap_load(path)["head"]  # maps the compressed bytes as if they were floats
    assert not torch.equal(plain, good_values)
    with pytest.raises(tk.CorruptFileError, match=rf"{record} is compressed"):
        tk.load_state_dict(path)


def test_missing_record_is_refused(tmp_path: Path) -> None:
    good, _ = _view_file(tmp_path)
    members = _members(good)
    record = _record(members)
    del members[record]
    path = _write_zip(tmp_path / "missing.pt", members)
    with pytest.raises(tk.CorruptFileError, match=rf"{record} is missing"):
        tk.load_state_dict(path)


def test_cli_scan_prints_problems_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, _ = _view_file(tmp_path)
    members = _members(good)
    record = _record(members)
    del members[record]
    path = _write_zip(tmp_path / "missing.pt", members)
    assert main(["scan", str(good)]) == 0
    capsys.readouterr()
    assert main(["scan", str(path)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out
    assert f"problem: record {record} is missing" in out


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning:zipfile")  # written on purpose
def test_repeated_record_is_refused(tmp_path: Path) -> None:
    good, _ = _view_file(tmp_path)
    members = _members(good)
    record = _record(members)
    path = tmp_path / "repeated.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(record, bytes(4000))  # a second copy: which one a reader takes varies
        for name, data in members.items():
            archive.writestr(name, data)
    report = tk.scan(path)
    assert [f.name for f in report.dangerous] == [record]
    assert "2 entries named" in report.dangerous[0].reason
    with pytest.raises(tk.UnsafeCheckpointError, match=record):
        tk.load_state_dict(path)


def test_negative_storage_size_is_refused(tmp_path: Path) -> None:
    good, _ = _view_file(tmp_path)
    members = _members(good)
    pickled = next(n for n in members if n.endswith("data.pkl"))
    data = members[pickled]
    numel = data.index(b"M\xe8\x03", data.index(b"cpu"))  # BININT2 1000, the storage's numel
    members[pickled] = data[:numel] + b"J\xff\xff\xff\xff" + data[numel + 3 :]
    path = _write_zip(tmp_path / "negative.pt", members)
    with pytest.raises(tk.CorruptFileError, match=r"-1 x torch\.FloatStorage, which torch cannot"):
        tk.load_state_dict(path)


def test_every_storage_of_a_real_model_checks_clean(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model.half()
    path = tmp_path / "model.pt"
    state = model.state_dict()
    state["untyped"] = torch.arange(5, dtype=torch.int64)
    torch.save(state, path)
    report = tk.scan(path)
    assert report.is_safe
    assert not report.problems
    loaded = tk.load_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_legacy_file_with_short_tensor_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(10.0)}, path, _use_new_zipfile_serialization=False)
    assert not tk.scan(path).problems
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(tk.CorruptFileError, match=r"declares 48 bytes of tensor data"):
        tk.load_state_dict(cut)


def test_legacy_tensor_bytes_are_never_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensor bytes after a legacy file's five pickles are data, even when they read as opcodes."""
    from torchkeep.security import scanner
    from torchkeep.security.walker import WalkLimits

    monkeypatch.setattr(
        scanner, "LIMITS", dataclasses.replace(LIMITS, walk=WalkLimits(opcodes=100_000))
    )
    path = tmp_path / "legacy.pt"
    nones = torch.full((1_000_000,), ord("N"), dtype=torch.uint8)  # a million NONE opcodes
    torch.save({"w": nones}, path, _use_new_zipfile_serialization=False)
    report = tk.scan(path)
    assert report.is_safe
    assert any("tensor data, never unpickled" in note for note in report.notes)
    assert torch.equal(tk.load_state_dict(path)["w"], nones)


# --- class 7: bounded memory, whatever the expansion ---------------------------------------


class _Entry:
    """One member of a hand-built zip: its name, raw (maybe deflated) bytes, CRC and size."""

    def __init__(self, name: str, data: bytes, *, expanded: tuple[int, int] | None = None):
        self.name = name.encode()
        self.data = data
        self.method = 8 if expanded else 0
        self.crc, self.size = expanded if expanded else (zlib.crc32(data), len(data))
        self.flags = 0


@functools.lru_cache(maxsize=8)
def _deflated(head: bytes, zeros: int) -> _Entry:
    """``head`` then ``zeros`` zero bytes as one raw deflate stream, never held expanded."""
    packer = zlib.compressobj(1, zlib.DEFLATED, -15)
    parts = [packer.compress(head)]
    crc = zlib.crc32(head)
    chunk = bytes(MiB)
    for _ in range(zeros // MiB):
        parts.append(packer.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    parts.append(packer.flush())
    return _Entry("", b"".join(parts), expanded=(crc, len(head) + zeros // MiB * MiB))


def _zip_bytes(entries: list[_Entry]) -> bytes:
    """A zip written by hand (zipfile cannot take an already deflated stream)."""
    out = io.BytesIO()
    central = []
    for entry in entries:
        offset = out.tell()
        fields = (20, entry.flags, entry.method, 0, 0x21, entry.crc, len(entry.data), entry.size)
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, len(entry.name), 0))
        out.write(entry.name + entry.data)
        central.append(
            struct.pack("<IH", 0x02014B50, 20) + struct.pack("<HHHHHIII", *fields)
            + struct.pack("<HHHHHII", len(entry.name), 0, 0, 0, 0, 0, offset) + entry.name
        )  # fmt: skip
    start = out.tell()
    out.write(b"".join(central))
    size = out.tell() - start
    out.write(
        struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), size, start, 0)
    )
    return out.getvalue()


def _bomb(name: str, head: bytes, zeros: int) -> _Entry:
    entry = _deflated(head, zeros)
    named = _Entry(name, entry.data, expanded=(entry.crc, entry.size))
    return named


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> list[_Entry]:
    """The members of a small valid torch.save file, stored."""
    path = tmp_path_factory.mktemp("base") / "base.pt"
    torch.save({"w": torch.arange(10.0)}, path)
    return [_Entry(name, data) for name, data in _members(path).items()]


@contextlib.contextmanager
def _peak() -> Iterator[list[int]]:
    """Measure the peak of Python allocations inside the block (``result[0]``, bytes)."""
    result = [0]
    tracemalloc.start()
    try:
        yield result
    finally:
        result[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


_BIG = 256 * MiB  # each bomb expands to this (the file is about 1 MiB)


@pytest.mark.parametrize(
    ("member", "head"),
    [
        ("archive/models/x.json", b'{"graph_module": "'),  # read whole by the program check
        ("archive/extra.pkl", b"\x80\x02("),  # a pickle
        ("archive/weights.bin", b"PK\x03\x04"),  # looks like a nested zip
        ("archive/notes.txt", b"cos\nsystem\n"),  # a protocol-0 pickle under any name
    ],
)
def test_zip_bomb_member_is_refused_in_bounded_memory(
    tmp_path: Path, base: list[_Entry], member: str, head: bytes
) -> None:
    path = tmp_path / "bomb.pt"
    path.write_bytes(_zip_bytes([*base, _bomb(member, head, _BIG)]))
    assert path.stat().st_size * LIMITS.max_ratio < _BIG
    with zipfile.ZipFile(path) as archive:  # a real bomb: the declared expansion is all there
        assert archive.getinfo(member).file_size >= _BIG
    for read in (lambda: tk.scan(path), lambda: tk.load_state_dict(path)):
        with _peak() as peak, pytest.raises(tk.ResourceLimitError) as info:
            read()
        assert peak[0] < _BOUND, f"{peak[0] / MiB:.0f} MiB"
        assert member in str(info.value)
        assert "expands" in str(info.value)


def test_compressed_tensor_record_is_never_expanded(tmp_path: Path, base: list[_Entry]) -> None:
    record = next(e for e in base if e.name.endswith(b"/data/0"))
    entries = [e for e in base if e is not record]
    path = tmp_path / "record_bomb.pt"
    path.write_bytes(_zip_bytes([*entries, _bomb(record.name.decode(), b"", _BIG)]))
    with _peak() as peak, pytest.raises(tk.CorruptFileError, match="is compressed"):
        tk.load_state_dict(path)
    assert peak[0] < _BOUND


def test_nested_zips_share_one_budget(tmp_path: Path, base: list[_Entry]) -> None:
    """Members each under every per-member cap, nested, still expand past the file's budget."""
    inner = _zip_bytes([_bomb(f"inner/part{i}", b"", 12 * MiB) for i in range(3)])
    with zipfile.ZipFile(io.BytesIO(inner)) as archive:
        assert all(i.file_size < LIMITS.ratio_floor for i in archive.infolist())
    path = tmp_path / "nested.pt"
    path.write_bytes(_zip_bytes([*base, _Entry("archive/inner.zip", inner)]))
    assert path.stat().st_size * LIMITS.max_ratio < 36 * MiB
    with _peak() as peak, pytest.raises(tk.ResourceLimitError, match="expand to more than"):
        tk.scan(path)
    assert peak[0] < _BOUND


def test_inspect_of_a_program_with_a_bomb_config_is_refused(
    net_bundle: Path, tmp_path: Path
) -> None:
    """``inspect`` reads a .pt2's weights configs: they go through the bounded member reader."""
    skip_unless_programs_load()
    program = net_bundle / "program.pt2"
    members = _members(program)
    config = next(n for n in members if n.endswith("_weights_config.json"))
    kept = {n: d for n, d in members.items() if n != config and "/weights/weight_" not in n}
    entries = [_Entry(name, data) for name, data in kept.items()]  # small: no raw weights
    path = tmp_path / "bomb.pt2"
    path.write_bytes(_zip_bytes([*entries, _bomb(config, b'{"config": {"', _BIG)]))
    assert path.stat().st_size * LIMITS.max_ratio < _BIG
    with _peak() as peak, pytest.raises(tk.ResourceLimitError, match="expands") as info:
        describe(path)
    assert peak[0] < _BOUND, f"{peak[0] / MiB:.0f} MiB"
    assert config in str(info.value)
    assert describe(program).tensors  # the clean program's configs are still read


def _duplicate_central_entry(content: bytes, name: str, copies: int) -> bytes:
    """Add ``copies`` central-directory entries that point at ``name``'s one local header."""
    end = content.rindex(struct.pack("<I", 0x06054B50))
    count, size, start = struct.unpack_from("<HII", content, end + 10)
    directory = content[start : start + size]
    position = directory.index(name.encode()) - 46  # the fixed part of a central entry
    entry = directory[position : position + 46 + len(name)]
    directory += entry * copies
    tail = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, count + copies, count + copies, len(directory), start, 0
    )
    return content[:start] + directory + tail


def test_overlapping_members_are_refused(tmp_path: Path, base: list[_Entry]) -> None:
    """A non-recursive bomb: many central-directory entries over one deflated stream."""
    content = _zip_bytes([*base, _bomb("archive/k", b"", 12 * MiB)])
    path = tmp_path / "overlap.pt"
    path.write_bytes(_duplicate_central_entry(content, "archive/k", 4))
    with zipfile.ZipFile(path) as archive:
        assert [i.filename for i in archive.infolist()].count("archive/k") == 5
    with _peak() as peak, pytest.raises(tk.ResourceLimitError, match="expand to more than"):
        tk.scan(path)
    assert peak[0] < _BOUND


def test_damaged_or_encrypted_member_is_a_typed_error(tmp_path: Path, base: list[_Entry]) -> None:
    garbage = _Entry("archive/extra.pkl", b"\xff" * 64, expanded=(0, 1000))  # not deflate data
    path = tmp_path / "damaged.pt"
    path.write_bytes(_zip_bytes([*base, garbage]))
    with pytest.raises(tk.CorruptFileError, match="damaged"):
        tk.scan(path)
    secret = _Entry("archive/extra.pkl", b"\x80\x02N.")
    secret.flags = 0x1
    path.write_bytes(_zip_bytes([*base, secret]))
    with pytest.raises(tk.CorruptFileError, match="encrypted"):
        tk.scan(path)


def test_large_member_under_the_caps_is_streamed(tmp_path: Path, base: list[_Entry]) -> None:
    """A pickle holding 15 MiB of bytes is walked without ever holding those bytes."""
    size = 15 * MiB
    head = b"\x80\x04\x8e" + struct.pack("<Q", size)  # BINBYTES8: the zeros follow
    bomb = _deflated(head, size)
    entry = _Entry("archive/blob.pkl", bomb.data, expanded=(bomb.crc, bomb.size))
    path = tmp_path / "blob.pt"
    path.write_bytes(_zip_bytes([*base, entry]))
    with _peak() as peak:
        report = tk.scan(path)
    assert peak[0] < 8 * MiB, f"{peak[0] / MiB:.1f} MiB"
    assert report.is_safe
    assert any("blob.pkl" in note for note in report.notes)  # truncated before STOP: noted


def test_pickle_with_too_many_values_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep.security import scanner
    from torchkeep.security.walker import WalkLimits

    monkeypatch.setattr(
        scanner, "LIMITS", dataclasses.replace(LIMITS, walk=WalkLimits(symbols=100_000))
    )
    path = tmp_path / "wide.pkl"
    path.write_bytes(b"\x80\x02(" + b"N" * 200_000 + b"t.")  # a tuple: no fast path
    with pytest.raises(tk.ResourceLimitError, match="more than 100,000 values"):
        tk.scan(path)


@pytest.mark.parametrize("members", [1, 3])
def test_pickles_with_too_many_opcodes_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, members: int
) -> None:
    """The opcode budget is per file: spreading the opcodes over members does not help."""
    from torchkeep.security import scanner
    from torchkeep.security.walker import WalkLimits

    monkeypatch.setattr(
        scanner, "LIMITS", dataclasses.replace(LIMITS, walk=WalkLimits(opcodes=100_000))
    )
    ops = 150_000 // members
    long_pickle = b"\x80\x02N" + b"0N" * (ops // 2) + b"."
    path = _torch_zip_with(tmp_path, {f"good/part{i}.bin": long_pickle for i in range(members)})
    with pytest.raises(tk.ResourceLimitError, match="more than 100,000 pickle opcodes"):
        tk.scan(path)


def test_stream_of_many_tiny_pickles_is_refused(tmp_path: Path) -> None:
    """Each pickle walked is listed in the report: 100,000 of them would cost 50x the file."""
    path = tmp_path / "many.pkl"
    path.write_bytes(b"N." * 100_000)
    with _peak() as peak, pytest.raises(tk.ResourceLimitError, match="more than 10,000 pickles"):
        tk.scan(path)
    assert peak[0] < _BOUND


# --- class 2 (generic part): every member is a potential pickle -----------------------------


def _payload(canary: Path) -> bytes:
    """A protocol-0 pickle: starts with ``c``, not ``\\x80``."""
    return f"cos\nsystem\n(S'touch {canary}'\ntR.".encode()


def _torch_zip_with(tmp_path: Path, extra: dict[str, bytes]) -> Path:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(4.0)}, good)
    members = _members(good)
    members.update(extra)
    return _write_zip(tmp_path / "hostile.pt", members)


MEMBER_LOAD = "import pickle, zipfile\npickle.loads(zipfile.ZipFile({path}).read({member!r}))"


@pytest.mark.parametrize("member", ["good/notes.txt", "good/model.safetensors", "good/data/x"])
def test_protocol_0_pickle_under_any_member_name_is_found(tmp_path: Path, member: str) -> None:
    canary = tmp_path / "canary"
    path = _torch_zip_with(tmp_path, {member: _payload(canary)})
    prove_live(MEMBER_LOAD.replace("{member!r}", repr(member)), canary, path=path)
    report = tk.scan(path)
    assert [f.name for f in report.dangerous] == ["os.system", "os.system"]
    assert all(f.where.startswith(member) for f in report.dangerous)
    with pytest.raises(tk.UnsafeCheckpointError, match=r"os\.system"):
        tk.load_state_dict(path)
    assert not canary.exists()


def test_protocol_0_data_pkl_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = _torch_zip_with(tmp_path, {"good/data.pkl": _payload(canary)})
    prove_live(TORCH_LOAD, canary, path=path)
    with pytest.raises(tk.UnsafeCheckpointError, match=r"os\.system"):
        tk.load_state_dict(path)
    assert not canary.exists()


def test_protocol_0_pickle_as_program_sample_inputs_is_found(
    tmp_path: Path, net_bundle: Path
) -> None:
    skip_unless_programs_load()
    canary = tmp_path / "canary"
    members = _members(net_bundle / "program.pt2")
    target = next(n for n in members if n.endswith("data/sample_inputs/model.pt"))
    members[target] = _payload(canary)
    path = _write_zip(tmp_path / "hostile.pt2", members)
    prove_live(EXPORT_LOAD, canary, path=path)
    report = tk.scan(path)
    assert any(f.name == "os.system" and f.where.startswith(target) for f in report.dangerous)
    assert not canary.exists()


def test_storage_exemption_cannot_hide_a_pickle(tmp_path: Path) -> None:
    """A decoy pickle that declares storages does not exempt records it does not own.

    Only decimal keys under the declaring pickle's own directory are exempt: a decoy that
    names ``payload`` or ``../good/x`` exempts nothing, so the payload is still walked.
    """
    canary = tmp_path / "canary"

    class Ref:
        def __init__(self, key: str) -> None:
            self.key = key

    class Decoy(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if isinstance(obj, Ref):
                return ("storage", torch.FloatStorage, obj.key, "cpu", 1)
            return None

    buffer = io.BytesIO()
    Decoy(buffer, protocol=2).dump([Ref("payload"), Ref("../good/x")])
    member = "decoy/payload"
    path = _torch_zip_with(
        tmp_path,
        {"decoy.pkl": buffer.getvalue(), member: _payload(canary), "good/x": _payload(canary)},
    )
    prove_live(MEMBER_LOAD.replace("{member!r}", repr(member)), canary, path=path)
    report = tk.scan(path)
    assert [f.name for f in report.dangerous] == ["os.system", "os.system"]
    walked = {entry.split("@")[0] for entry in report.pickles}
    assert {member, "good/x"} <= walked
    assert not canary.exists()


def test_every_member_of_a_clean_program_is_walked_without_findings(net_bundle: Path) -> None:
    report = tk.scan(net_bundle / "program.pt2")
    assert report.is_safe, report.findings
    with zipfile.ZipFile(net_bundle / "program.pt2") as archive:
        count = len([n for n in archive.namelist() if not n.endswith("/")])
    walked = {entry.split("@")[0] for entry in report.pickles}
    (note,) = [note for note in report.notes if note.startswith("not pickles")]
    not_pickles = int(note.split("(")[1].split(")")[0])
    # every member but the nested torch zip (scanned as a zip, its records exempt) is walked
    assert len(walked) + not_pickles >= count - 1


# --- the walk stops only where every unpickler stops ----------------------------------------


def _system(canary: Path) -> bytes:
    return f"cos\nsystem\n(S'touch {canary}'\ntR.".encode()


WALK_EVASIONS = {
    # a string longer than any kept string, then the payload
    "long_string": lambda c: b"S'" + b"x" * 10_000 + b"'\n0" + _system(c),
    # an INT in a base torch's own parsers would not take
    "hex_int": lambda c: b"I0x10\n0" + _system(c),
    # a run of plain values popped by POP_MARK (the walk's fast path), then the payload
    "data_run": lambda c: b"\x80\x02(" + b"N" * 5000 + b"K\x01G" + bytes(8) + b"1" + _system(c),
    # a run the fast path must not skip: not followed by an opcode that pops to the MARK
    "data_run_tuple": lambda c: b"\x80\x02(" + b"N" * 5000 + b"t0" + _system(c),
    # a dotted name longer than the walk keeps, which protocol 4 still resolves
    "long_dotted_name": lambda c: (
        b"\x80\x04cos\n" + b"path.os." * 700 + b"system\n(S'touch " + str(c).encode() + b"'\ntR."
    ),
}


@pytest.mark.parametrize("case", sorted(WALK_EVASIONS))
def test_payload_after_unusual_opcodes_is_still_found(tmp_path: Path, case: str) -> None:
    canary = tmp_path / "canary"
    raw = tmp_path / f"{case}.pkl"
    raw.write_bytes(WALK_EVASIONS[case](canary))
    prove_live(PICKLE_LOAD, canary, path=raw)
    assert tk.scan(raw).dangerous
    path = _torch_zip_with(tmp_path, {"good/data.pkl": raw.read_bytes()})
    prove_live(TORCH_LOAD, canary, path=path)
    assert tk.scan(path).dangerous
    with pytest.raises(tk.UnsafeCheckpointError):
        tk.load_state_dict(path)
    assert not canary.exists()


@pytest.mark.parametrize("seed", range(5))
def test_raw_bytes_in_a_member_are_not_taken_for_a_pickle(tmp_path: Path, seed: int) -> None:
    noise = torch.randn(4096, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()
    path = _torch_zip_with(tmp_path, {"good/extra/weights.bin": noise})
    report = tk.scan(path)
    assert report.is_safe, report.findings
    assert any("not pickles" in note and "good/extra/weights.bin" in note for note in report.notes)
