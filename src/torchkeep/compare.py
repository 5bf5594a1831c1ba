"""Comparing two stored state dicts tensor by tensor: the library behind ``diff``.

Values are compared in bounded chunks (float64, or complex128 for complex tensors, which hold
every float16/bfloat16/float8/float32 value exactly), so memory stays flat however large the
tensors are; integer and bool tensors of one dtype are compared exactly in their own dtype.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .remote_files import StorageOptions, check_options_used
from .storage.remote import is_remote
from .weights import load_state_dict

if TYPE_CHECKING:
    from .storage.transfer import Transfer

CHUNK_ELEMENTS = 1 << 20


class Status(str, enum.Enum):
    """How one tensor compares."""

    IDENTICAL = "identical"  # same dtype, shape and bytes
    CLOSE = "close"  # same dtype and shape, values within tolerance
    DIFFERENT = "different"  # values beyond tolerance
    DTYPE = "dtype changed"
    SHAPE = "shape changed"


@dataclass(frozen=True)
class TensorDiff:
    """The comparison of the tensors stored under one name in both files.

    Attributes:
        name: the key.
        status: how they compare.
        dtypes: the dtype in A and in B.
        shapes: the shape in A and in B.
        max_abs_diff: the largest ``|a - b|`` (``inf`` where only one side is NaN or the
            infinities differ); ``None`` when the shapes differ.
        outside: number of elements beyond ``atol + rtol * |b|``.
    """

    name: str
    status: Status
    dtypes: tuple[str, str]
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    max_abs_diff: float | None = None
    outside: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (an infinite difference is written as the string ``"inf"``)."""
        diff = self.max_abs_diff
        return {
            "name": self.name,
            "status": self.status.value,
            "dtype": list(self.dtypes),
            "shape": [list(self.shapes[0]), list(self.shapes[1])],
            "max_abs_diff": diff if diff is None or math.isfinite(diff) else str(diff),
            "outside_tolerance": self.outside,
        }


@dataclass
class DiffReport:
    """What differs between two state dicts.

    Attributes:
        a: the first file.
        b: the second file.
        rtol: relative tolerance used.
        atol: absolute tolerance used.
        only_in_a: keys only the first file has.
        only_in_b: keys only the second file has.
        tensors: one entry per common key, in the first file's order.
    """

    a: Path | str
    b: Path | str
    rtol: float
    atol: float
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    tensors: list[TensorDiff] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        """True when both hold the same keys, dtypes and shapes, and values within tolerance."""
        return not (self.only_in_a or self.only_in_b) and all(
            t.status in (Status.IDENTICAL, Status.CLOSE) for t in self.tensors
        )

    def count(self, status: Status) -> int:
        return sum(t.status == status for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the report."""
        return {
            "a": str(self.a),
            "b": str(self.b),
            "equal": self.equal,
            "rtol": self.rtol,
            "atol": self.atol,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "counts": {status.value: self.count(status) for status in Status},
            "tensors": [t.to_json() for t in self.tensors],
        }


def _wide(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.to(torch.complex128 if chunk.is_complex() else torch.float64)


def _exact_in_own_dtype(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Integers beyond 2**53 lose precision in float64, so compare them as they are."""
    return a.dtype == b.dtype and not (a.is_floating_point() or a.is_complex())


def _compare_chunk(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> tuple[float, int]:
    """``(max |a - b|, elements beyond tolerance)`` for two flat chunks of equal length."""
    wa, wb = _wide(a), _wide(b)
    same = (a == b) if _exact_in_own_dtype(a, b) else (wa == wb)
    same |= torch.isnan(wa) & torch.isnan(wb)
    diff = torch.nan_to_num((wa - wb).abs(), nan=math.inf, posinf=math.inf)
    diff[same] = 0.0
    # Integers that differ are at least 1 apart, even where float64 rounds them together.
    diff[~same & (diff == 0)] = 1.0
    within = same | (torch.isfinite(diff) & (diff <= atol + rtol * wb.abs()))
    return float(diff.max()) if diff.numel() else 0.0, int((~within).sum())


def compare_tensors(
    name: str, a: torch.Tensor, b: torch.Tensor, *, rtol: float = 0.0, atol: float = 0.0
) -> TensorDiff:
    """Compare two tensors stored under ``name``, reading them chunk by chunk.

    Args:
        name: the key, for the report.
        a: the tensor from the first file.
        b: the tensor from the second file.
        rtol: relative tolerance (``|a - b| <= atol + rtol * |b|``).
        atol: absolute tolerance.

    Returns:
        A :class:`TensorDiff`.

    Example:
        >>> compare_tensors("w", torch.ones(3), torch.ones(3) + 1e-7, atol=1e-6).status
        <Status.CLOSE: 'close'>
    """
    dtypes = (str(a.dtype).removeprefix("torch."), str(b.dtype).removeprefix("torch."))
    shapes = (tuple(a.shape), tuple(b.shape))
    if shapes[0] != shapes[1]:
        return TensorDiff(name, Status.SHAPE, dtypes, shapes)
    flat_a, flat_b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    identical = a.dtype == b.dtype
    max_diff, outside = 0.0, 0
    for start in range(0, flat_a.numel(), CHUNK_ELEMENTS):
        chunk_a = flat_a[start : start + CHUNK_ELEMENTS]
        chunk_b = flat_b[start : start + CHUNK_ELEMENTS]
        if identical and torch.equal(chunk_a.view(torch.uint8), chunk_b.view(torch.uint8)):
            continue
        identical = False
        chunk_max, chunk_outside = _compare_chunk(chunk_a, chunk_b, rtol, atol)
        max_diff, outside = max(max_diff, chunk_max), outside + chunk_outside
    if a.dtype != b.dtype:
        status = Status.DTYPE
    elif identical:
        status = Status.IDENTICAL
    else:
        status = Status.DIFFERENT if outside else Status.CLOSE
    return TensorDiff(name, status, dtypes, shapes, max_diff, outside)


def diff_state_dicts(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    paths: tuple[Path | str, Path | str] = (Path("a"), Path("b")),
) -> DiffReport:
    """Compare two state dicts key by key.

    Args:
        a: the first state dict.
        b: the second state dict.
        rtol: relative tolerance.
        atol: absolute tolerance.
        paths: names of the two sides, for the report.

    Returns:
        A :class:`DiffReport`.

    Example:
        >>> diff_state_dicts(model_a.state_dict(), model_b.state_dict()).equal
    """
    report = DiffReport(paths[0], paths[1], rtol, atol)
    report.only_in_a = [key for key in a if key not in b]
    report.only_in_b = [key for key in b if key not in a]
    report.tensors = [
        compare_tensors(key, a[key], b[key], rtol=rtol, atol=atol) for key in a if key in b
    ]
    return report


def diff_files(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    storage_options: StorageOptions | None = None,
    transfer: Transfer | None = None,
) -> DiffReport:
    """Compare the state dicts stored in two files of any readable format.

    Either side may be safetensors, a ``torch.save`` file (the model part of a checkpoint
    dict), a checkpoint or a bundle; nothing is executed and tensors are read lazily. Either
    side may be a URL (read as :func:`load_state_dict` reads one).

    Args:
        a: the first file (or URL).
        b: the second file (or URL).
        rtol: relative tolerance.
        atol: absolute tolerance.
        storage_options: options of the fsspec filesystem of whichever side is a URL.
        transfer: a :class:`Transfer` for whichever side is a URL.

    Returns:
        A :class:`DiffReport`; ``report.equal`` says whether they match.

    Example:
        >>> diff_files("before.pt", "after.safetensors", atol=1e-6).only_in_b
    """
    check_options_used((a, b), storage_options, transfer)
    sides = [str(p) if is_remote(p) else Path(p) for p in (a, b)]
    states = [
        load_state_dict(p, storage_options=storage_options, transfer=transfer)
        if isinstance(p, str)
        else load_state_dict(p)
        for p in sides
    ]
    return diff_state_dicts(*states, rtol=rtol, atol=atol, paths=(sides[0], sides[1]))
