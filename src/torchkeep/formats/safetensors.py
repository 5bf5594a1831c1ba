"""Reading and writing safetensors files without going through Python byte copies.

The layout is the public safetensors format (8-byte little-endian header length, a JSON header,
then the raw tensor bytes), so every file written here is readable by ``safetensors.safe_open``.
Writing streams each tensor's own memory to the file with ``writev``; reading either maps the file
lazily or ``preadv``-s straight into the memory of existing tensors. Headers are validated
completely before any tensor is built, so a hostile file gets a :class:`CorruptFileError`.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import math
import operator
import os
import reprlib
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch

from ..errors import CorruptFileError, UnsupportedValueError
from ..format_versions import check_weights_metadata
from ..hashing import Hasher
from ..storage.cache import CachePolicy, check_cache_policy, write_mode
from ..storage.reading import FileEndedError, RangeReader
from ..storage.stream import Span, write_stream

MAX_HEADER_BYTES = 100_000_000
_MAX_ELEMENTS = 2**63 - 1  # torch counts elements in a signed 64-bit integer
ALIASES_KEY = "torchkeep.aliases"
_IOV_MAX = 1024
_READ_CHUNK = 16 << 20
_READERS = 2

DTYPE_NAMES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _name, _attr in [
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("U64", "uint64"),
    ("U32", "uint32"),
    ("U16", "uint16"),
]:
    if hasattr(torch, _attr):
        DTYPE_NAMES[_name] = getattr(torch, _attr)
NAME_OF_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPE_NAMES.items()}


class TensorEntry(NamedTuple):
    """Where one tensor lives in a safetensors file (offsets are absolute file positions).

    A named tuple: headers hold tens of thousands of these, and tuples build fastest.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


_new_entry = functools.partial(tuple.__new__, TensorEntry)  # TensorEntry(*fields), in C
_DTYPE_FIELD = operator.itemgetter("dtype")
_SHAPE_FIELD = operator.itemgetter("shape")
_OFFSETS_FIELD = operator.itemgetter("data_offsets")
_ENTRY_DTYPE = operator.attrgetter("dtype")
_ITEMSIZE = operator.attrgetter("itemsize")
_ENTRY_SHAPE = operator.attrgetter("shape")
_ENTRY_BEGIN = operator.attrgetter("begin")
_ENTRY_END = operator.attrgetter("end")
_ENTRY_BEGIN_END = operator.attrgetter("begin", "end")
_COLUMN_MAX_DIMS = 64
_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 200
_BRIEF.maxlist = 16
_BRIEF.maxlong = 60


@dataclass(frozen=True)
class Header:
    """The validated header of a safetensors file."""

    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    aliases: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# writing


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor's memory (keep the tensor alive)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _storage_key(tensor: torch.Tensor) -> tuple[object, ...]:
    """Equal for two tensors exactly when they are the same view of the same memory."""
    key = (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
    return key if tensor.is_cpu else (*key, str(tensor.device))  # building devices is slow


def dedupe_tied(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split ``tensors`` into unique tensors and an ``alias -> canonical name`` map.

    Two names are tied when they are the very same view of one storage (same offset, shape,
    stride and dtype), as with an embedding shared by an output layer. Tensors that merely
    overlap are kept apart and written separately.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_at: dict[int, str] = {}  # data pointer -> first name; the full key only on a clash
    seen: dict[tuple[object, ...], str] = {}
    for name, tensor in tensors.items():
        if tensor.is_meta or tensor.numel() == 0:
            unique[name] = tensor
            continue
        pointer = tensor.data_ptr()
        earlier = first_at.setdefault(pointer, name)
        if earlier != name:
            seen.setdefault(_storage_key(tensors[earlier]), earlier)
            key = _storage_key(tensor)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        unique[name] = tensor
    return unique, aliases


def require_utf8(text: str, what: str) -> str:
    """``text`` if it can be written into a (UTF-8) safetensors header, else
    :class:`UnsupportedValueError` naming ``what`` (a lone surrogate, ``"\ud800"``, cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedValueError(
            f"{what} {text[:80]!r} is not valid Unicode (it holds a lone surrogate), so it "
            "cannot be written into a safetensors header; rename it"
        ) from None
    return text


def validate_for_save(tensors: Mapping[str, object], *, header: bool = True) -> None:
    """Raise before anything is written if some entry cannot be stored as a tensor (with its
    name in a safetensors header, unless ``header`` is False: a ``torch.save`` file)."""
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict key {name!r} is not a string; safetensors needs str keys")
        if header:
            require_utf8(name, "tensor name")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                "a weights file holds tensors only (use a CheckpointManager for other state)"
            )
        if value.layout != torch.strided:  # sparse, jagged, ...
            raise TypeError(
                f"tensor {name!r} has layout {value.layout}; call .to_dense() before saving"
            )
        if value.is_meta:
            raise ValueError(f"tensor {name!r} is on the meta device and has no data to save")
        if value.dtype not in NAME_OF_DTYPE:
            raise TypeError(
                f"tensor {name!r} has dtype {value.dtype}, which safetensors cannot store; "
                "convert it (e.g. .to(torch.float32)) or save to a .pt file"
            )


def _layout(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, int, int]]:
    """Order tensors so that every one starts aligned to its element size; assign offsets."""
    order: Iterable[tuple[str, torch.Tensor]] = tensors.items()
    if len({tensor.dtype for tensor in tensors.values()}) > 1:  # one dtype needs no sorting
        order = sorted(order, key=lambda item: -item[1].dtype.itemsize)
    placed = []
    offset = 0
    for name, tensor in order:
        size = tensor.nbytes
        placed.append((name, tensor, offset, offset + size))
        offset += size
    return placed


def _encode_header(
    placed: list[tuple[str, torch.Tensor, int, int]], metadata: Mapping[str, str]
) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, tensor, begin, end in placed:
        header[name] = {
            "dtype": NAME_OF_DTYPE[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [begin, end],
        }
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body


def _contiguous_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its bytes can be written as they are, else a contiguous CPU copy."""
    if tensor.is_cpu and tensor.is_contiguous():
        return tensor
    return tensor.detach().to("cpu").contiguous()


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Iterator[Span]:
    """The memory of a safetensors file holding ``tensors``: the header, then each tensor.

    Tensors are laid out largest element size first, so each starts aligned for zero-copy
    mapping. Each span is valid only until the next one is requested: a tensor that is not a
    contiguous CPU tensor is copied, one at a time.
    """
    placed = _layout(tensors)
    header = bytearray(_encode_header(placed, metadata))
    yield ctypes.addressof(ctypes.c_char.from_buffer(header)), len(header)
    for _name, tensor, begin, end in placed:
        if end > begin:
            source = _contiguous_cpu(tensor)  # a copy must outlive its span: keep it bound
            yield source.data_ptr(), end - begin


def write_file(
    f: BinaryIO,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    hasher: Hasher | None = None,
    cache: CachePolicy = "auto",
) -> int:
    """Write ``tensors`` (already deduplicated and validated) to the new, empty file ``f``.

    The file is streamed as described in :mod:`torchkeep.storage.stream`, through the page cache
    or around it as ``cache`` decides (:mod:`torchkeep.storage.cache`); the caller fsyncs it.
    ``metadata`` goes to ``__metadata__``; ``hasher``, when given, sees every byte written.

    Returns:
        The file's size in bytes.

    Raises:
        CachePolicyError: ``cache`` names no policy (checked before anything is written).
    """
    mode = write_mode(check_cache_policy(cache), sum(t.nbytes for t in tensors.values()))
    return write_stream(f.fileno(), encode(tensors, metadata or {}), hasher, mode=mode)


# --------------------------------------------------------------------------------------------
# reading


def _corrupt(path: Path, problem: str) -> CorruptFileError:
    return CorruptFileError(
        f"{path} is not a valid safetensors file: {problem}. The file is damaged or was not "
        "written completely; re-create it from its source"
    )


def _parse_entries(
    path: Path, header: Mapping[str, object], data_start: int, data_len: int
) -> dict[str, TensorEntry]:
    """Validate every header entry.

    A well-formed header is checked by :func:`_parse_columns`, column by column, in C-level
    builtins with no Python code per entry. A header it does not accept whole is checked
    again entry by entry by :func:`_parse_entry_thoroughly`, which names what is wrong; the
    column checks accept only entries the thorough ones accept.
    """
    entries = _parse_columns(path, header, data_start, data_len)
    if entries is None:
        entries = {
            name: _parse_entry_thoroughly(path, name, raw, data_start, data_len)
            for name, raw in header.items()
        }
    return entries


def _parse_columns(
    path: Path, header: Mapping[str, object], data_start: int, data_len: int
) -> dict[str, TensorEntry] | None:
    """The entries of ``header`` if every one passes the column checks, else None.

    Each field of every entry is gathered into a list with ``map`` and checked for all entries
    at once (types by ``set(map(type, ...))``, bounds by ``min``/``max``, sizes by comparing
    lists): 20,000 entries take a few milliseconds, against ~30 ms for a Python loop over them.
    A shape of more than ``_COLUMN_MAX_DIMS`` dimensions, or one with a dimension longer than
    the data section, is left to the thorough checks, so no product here grows large; an entry
    with no elements is checked thoroughly as well (its shape is not bounded by its bytes).
    """
    names = list(header)
    raws: list[Any] = list(header.values())
    try:  # a field missing, an entry that is not an object, an unknown or unhashable dtype
        dtypes = list(map(DTYPE_NAMES.__getitem__, map(_DTYPE_FIELD, raws)))
        shapes = list(map(_SHAPE_FIELD, raws))
        offsets = list(map(_OFFSETS_FIELD, raws))
    except (KeyError, TypeError):
        return None
    if not (
        set(map(type, shapes)) <= {list}
        and set(map(type, offsets)) <= {list}
        and set(map(len, offsets)) <= {2}
        and max(map(len, shapes), default=0) <= _COLUMN_MAX_DIMS
    ):
        return None
    dims = list(itertools.chain.from_iterable(shapes))
    bounds = list(itertools.chain.from_iterable(offsets))
    if not (
        set(map(type, dims)) <= {int}  # not bool, not float
        and set(map(type, bounds)) <= {int}
        and min(dims, default=0) >= 0
        and max(dims, default=0) <= data_len
        and min(bounds, default=0) >= 0
        and max(bounds, default=0) <= data_len
    ):
        return None
    begins, ends = bounds[0::2], bounds[1::2]
    counts = list(map(math.prod, shapes))
    nbytes = map(operator.mul, counts, map(_ITEMSIZE, dtypes))
    if list(nbytes) != list(map(operator.sub, ends, begins)):  # so also begin <= end
        return None
    for index in itertools.compress(range(len(counts)), map(operator.not_, counts)):
        _parse_entry_thoroughly(path, names[index], raws[index], data_start, data_len)
    fields = zip(
        names,
        dtypes,
        map(tuple, shapes),
        map(operator.add, begins, itertools.repeat(data_start)),
        map(operator.add, ends, itertools.repeat(data_start)),
        strict=True,
    )
    return dict(zip(names, map(_new_entry, fields), strict=True))


def _element_count(shape: Iterable[int]) -> int | None:
    """The product of the non-zero dimensions of ``shape``, or None once it passes what torch
    can count (looking no further: a product of millions of dimensions would take hours)."""
    count = 1
    for dim in shape:
        if dim:
            count *= dim
            if count > _MAX_ELEMENTS:
                return None
    return count


def _brief(value: object) -> str:
    """``repr(value)``, shortened for an error message (a hostile header may hold huge values)."""
    return _BRIEF.repr(value)


def _parse_entry_thoroughly(
    path: Path, name: str, raw: object, data_start: int, data_len: int
) -> TensorEntry:
    shown = _brief(name)
    if not isinstance(raw, dict):
        raise _corrupt(path, f"entry {shown} is not an object")
    dtype_name = raw.get("dtype")
    shape = raw.get("shape")
    offsets = raw.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPE_NAMES:
        raise _corrupt(path, f"tensor {shown} has unknown dtype {_brief(dtype_name)}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _corrupt(path, f"tensor {shown} has an invalid shape {_brief(shape)}")
    if _element_count(shape) is None:
        # Even with a zero dimension (no data), torch cannot represent such a shape.
        raise _corrupt(path, f"tensor {shown} has a shape {_brief(shape)} too large for a tensor")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _corrupt(path, f"tensor {shown} has invalid data_offsets {_brief(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _corrupt(
            path,
            f"tensor {shown} has data_offsets {offsets} outside the {data_len}-byte data section",
        )
    dtype = DTYPE_NAMES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if expected != end - begin:
        raise _corrupt(
            path,
            f"tensor {shown} of shape {_brief(shape)} and dtype {dtype_name} needs {expected} "
            f"bytes but its data_offsets span {end - begin}",
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)  # one C call; a duplicate shows as a shorter dict
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the name {key!r} appears twice")
            seen.add(key)
    return result


def _parse_json(path: Path, text: str, what: str) -> object:
    """Parse JSON from a file, turning every way it can fail into a :class:`CorruptFileError`.

    Duplicate keys are refused (readers would disagree on which value wins); so are nesting
    too deep for the parser and integers too long to convert, which Python reports as
    ``RecursionError`` and ``ValueError`` rather than ``JSONDecodeError``.
    """
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(path, f"{what} is not valid JSON ({exc})") from None


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and fully validate the header of the safetensors file at ``path``."""
    path = Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"it is {file_size} bytes long, shorter than the 8-byte prefix")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise _corrupt(path, f"the header claims {header_len} bytes (limit {MAX_HEADER_BYTES})")
        if header_len > file_size - 8:
            raise _corrupt(
                path, f"the header claims {header_len} bytes but the file has {file_size - 8}"
            )
        raw_header = f.read(header_len)
    try:
        text = raw_header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _corrupt(path, f"the header is not UTF-8 ({exc})") from None
    header = _parse_json(path, text, "the header")
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    data_start = 8 + header_len
    data_len = file_size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    check_weights_metadata(metadata, source=path)
    entries = _parse_entries(path, header, data_start, data_len)
    _check_coverage(path, entries, data_start, file_size)
    aliases = _parse_aliases(path, metadata, entries)
    return Header(path, entries, metadata, data_start, file_size, aliases)


def _check_coverage(
    path: Path, entries: Mapping[str, TensorEntry], data_start: int, file_size: int
) -> None:
    """Tensors must tile the data section exactly: no overlaps, no holes, nothing after.

    In offset order, each tensor must begin where the one before it ends (the first at the
    data section's start) and the last end at the end of the file; both are checked as one
    comparison of lists, and only a file that fails it is walked to name the problem.
    """
    ordered = sorted(entries.values(), key=_ENTRY_BEGIN_END)  # linear if already in order
    ends = list(map(_ENTRY_END, ordered))
    if [data_start, *ends[:-1]] == list(map(_ENTRY_BEGIN, ordered)) and (
        ends[-1] if ends else data_start
    ) == file_size:
        return
    position = data_start
    for entry in ordered:
        if entry.begin < position:
            raise _corrupt(path, f"tensor {_brief(entry.name)} overlaps the tensor before it")
        if entry.begin > position:
            raise _corrupt(path, f"there are unused bytes before tensor {_brief(entry.name)}")
        position = entry.end
    raise _corrupt(path, f"the tensors end at byte {position} but the file has {file_size} bytes")


def _parse_aliases(
    path: Path, metadata: Mapping[str, str], entries: Mapping[str, TensorEntry]
) -> dict[str, str]:
    raw = metadata.get(ALIASES_KEY)
    if raw is None:
        return {}
    aliases = _parse_json(path, raw, f"metadata {ALIASES_KEY!r}")
    if not isinstance(aliases, dict):
        raise _corrupt(path, f"metadata {ALIASES_KEY!r} is not an object")
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in entries:
            raise _corrupt(
                path, f"tied name {_brief(alias)} points to missing tensor {_brief(target)}"
            )
        if alias in entries:
            raise _corrupt(path, f"tied name {_brief(alias)} is also stored as a tensor")
    return dict(aliases)


def _map_file(header: Header) -> torch.Tensor:
    """Map the whole file privately (copy-on-write) as a flat uint8 tensor; pages load lazily."""
    storage = torch.UntypedStorage.from_file(str(header.path), False, header.file_size)
    return torch.empty(0, dtype=torch.uint8).set_(storage)  # type: ignore[arg-type]


def _typed(mapped: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All of ``mapped`` that fits, viewed as elements of ``dtype``."""
    return mapped[: len(mapped) // dtype.itemsize * dtype.itemsize].view(dtype)


def _viewer(mapped: torch.Tensor) -> Callable[[TensorEntry], torch.Tensor]:
    """A function giving each entry as a view of ``mapped``, made with one call per tensor."""
    typed: dict[torch.dtype, torch.Tensor] = {}

    def view(entry: TensorEntry) -> torch.Tensor:
        size = entry.dtype.itemsize
        if entry.begin % size:  # a misaligned tensor from another writer: copy it into place
            return mapped[entry.begin : entry.end].clone().view(entry.dtype).view(entry.shape)
        whole = typed.get(entry.dtype)
        if whole is None:
            whole = typed[entry.dtype] = _typed(mapped, entry.dtype)
        return whole.as_strided(entry.shape, _contiguous_strides(entry.shape), entry.begin // size)

    return view


def _views(mapped: torch.Tensor, entries: Collection[TensorEntry]) -> list[torch.Tensor]:
    """Every entry, in order, as a view of ``mapped`` (the whole file).

    The same views as :func:`_viewer` gives, made without Python code per tensor when every
    tensor is aligned to its element size (as every writer here aligns them): one
    ``as_strided`` per tensor, driven by ``map`` over the columns of each dtype.
    """
    dtypes = list(map(_ENTRY_DTYPE, entries))
    begins = list(map(_ENTRY_BEGIN, entries))
    itemsizes = list(map(_ITEMSIZE, dtypes))
    if any(map(operator.mod, begins, itemsizes)):
        return list(map(_viewer(mapped), entries))
    shapes = list(map(_ENTRY_SHAPE, entries))
    columns = list(
        zip(
            shapes,
            map(_contiguous_strides, shapes),
            map(operator.floordiv, begins, itemsizes),
            strict=True,
        )
    )
    made = {
        dtype: itertools.starmap(
            _typed(mapped, dtype).as_strided,
            itertools.compress(columns, map(operator.is_, dtypes, itertools.repeat(dtype))),
        )
        for dtype in set(dtypes)
    }
    return list(map(next, map(made.__getitem__, dtypes)))  # each dtype's views, in file order


@functools.lru_cache(maxsize=4096)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def load_tensors(header: Header, *, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Return every tensor of the file, tied names as the very same tensor.

    On the CPU the tensors are lazy views into a private memory map; elsewhere they are copied
    to ``device`` one at a time. Callers that read every byte of a file that is not in the page
    cache read it with :func:`read_owned` instead.
    """
    result: dict[str, torch.Tensor] = {}
    if header.file_size > 0 and header.entries:
        tensors = _views(_map_file(header), header.entries.values())
        if device is not None and device.type != "cpu":
            tensors = [tensor.to(device) for tensor in tensors]
        result = dict(zip(header.entries, tensors, strict=True))
    for alias, target in header.aliases.items():
        result[alias] = result[target]
    return result


def read_owned(header: Header, reader: RangeReader) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """Read every stored tensor (not the tied names) into memory of its own, in file order.

    Each tensor is yielded as soon as its bytes are in, while ``_READERS`` threads read the
    tensors after it (a large one split between them), so the caller can hash one tensor
    while the next is read. ``reader`` reads cached ranges from the page cache and the rest
    direct or buffered as measured. Every yielded tensor is contiguous and the only tensor on
    its storage; tensors stored misaligned by other writers come back aligned.

    Raises:
        CorruptFileError: the file ended early (truncated while being read).
    """
    ordered = sorted(header.entries.values(), key=_ENTRY_BEGIN)
    tensors = [torch.empty(entry.shape, dtype=entry.dtype) for entry in ordered]
    reads = _plan_reads([pair for pair in zip(ordered, tensors, strict=True) if pair[0].nbytes])
    pool = ThreadPoolExecutor(_READERS)
    try:
        ends = [start + sum(map(len, buffers)) for buffers, start in reads]
        futures = [
            pool.submit(_read_range, reader, buffers, start, header.path)
            for buffers, start in reads
        ]
        pending = iter(zip(ends, futures, strict=True))
        read_to = header.data_start
        for entry, tensor in zip(ordered, tensors, strict=True):
            while read_to < entry.end:  # reads finish out of order: wait for them in order
                read_to, future = next(pending)
                future.result()
            yield entry, tensor
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _direct_target(entry: TensorEntry, target: torch.Tensor) -> bool:
    return (
        target.is_cpu
        and target.dtype == entry.dtype
        and target.shape == entry.shape
        and target.is_contiguous()
    )


def read_into(header: Header, targets: Mapping[str, torch.Tensor]) -> None:
    """Copy the stored tensors named in ``targets`` into those tensors' memory.

    Shapes must already match. CPU targets of the stored dtype are filled by
    :class:`~torchkeep.storage.reading.RangeReader` (from the page cache where the file is
    cached, else direct or buffered as measured; large reads split between threads); others are
    copied from a memory map, converting dtype.
    """
    direct: list[tuple[TensorEntry, torch.Tensor]] = []
    converted: list[tuple[TensorEntry, torch.Tensor]] = []
    for name, target in targets.items():
        entry = header.entries[header.aliases.get(name, name)]
        (direct if _direct_target(entry, target) else converted).append((entry, target))
    reads = _plan_reads(sorted(direct, key=lambda pair: pair[0].begin))
    with RangeReader(header.path) as reader:
        _run_parallel(
            [functools.partial(_read_range, reader, *read, header.path) for read in reads]
        )
    if converted:
        view = _viewer(_map_file(header))
        with torch.no_grad():
            for entry, target in converted:
                target.copy_(view(entry))


def _plan_reads(
    pairs: list[tuple[TensorEntry, torch.Tensor]],
) -> list[tuple[list[memoryview], int]]:
    """Group targets into ``(buffers, file offset)`` reads of consecutive file ranges.

    A read holds at most ``_IOV_MAX`` buffers and ``_READ_CHUNK`` bytes; a bigger tensor is
    split, so that several threads can share it.
    """
    reads: list[tuple[list[memoryview], int]] = []
    buffers: list[memoryview] = []
    start = end = size = 0
    for entry, target in pairs:
        whole = tensor_bytes(target)
        pieces = [whole] if len(whole) <= _READ_CHUNK else _split(whole)
        position = entry.begin
        for piece in pieces:
            if buffers and (
                position != end or len(buffers) >= _IOV_MAX or size + len(piece) > _READ_CHUNK
            ):
                reads.append((buffers, start))
                buffers, size = [], 0
            if not buffers:
                start = position
            buffers.append(piece)
            size += len(piece)
            position = end = position + len(piece)
    if buffers:
        reads.append((buffers, start))
    return reads


def _split(view: memoryview) -> list[memoryview]:
    return [view[at : at + _READ_CHUNK] for at in range(0, len(view), _READ_CHUNK)]


def _run_parallel(calls: list[Callable[[], None]]) -> None:
    """Run ``calls`` on ``_READERS`` threads (``preadv`` releases the GIL); re-raise errors."""
    if len(calls) < 2:
        for call in calls:
            call()
        return
    with ThreadPoolExecutor(_READERS) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


def _read_range(reader: RangeReader, buffers: list[memoryview], offset: int, path: Path) -> None:
    try:
        reader.read(buffers, offset)
    except FileEndedError:
        raise _corrupt(path, "the file ended early (was it truncated while being read?)") from None


def summarize_dtypes(tensors: Iterable[torch.Tensor]) -> str:
    """A compact ``dtype:count`` summary, stored in metadata for humans and ``inspect``."""
    counts: dict[str, int] = {}
    for tensor in tensors:
        counts[NAME_OF_DTYPE[tensor.dtype]] = counts.get(NAME_OF_DTYPE[tensor.dtype], 0) + 1
    return ",".join(f"{name}:{count}" for name, count in sorted(counts.items()))


def is_safetensors(prefix: bytes) -> bool:
    """Sniff: an 8-byte header length followed by ``{``.

    The length is not checked against the limit or the file size, so a truncated file or an
    absurd length is still recognised (and :func:`read_header` says precisely what is wrong).
    """
    if len(prefix) < 9 or prefix[8:9] != b"{":
        return False
    header_len: int = struct.unpack("<Q", prefix[:8])[0]
    return header_len >= 2
