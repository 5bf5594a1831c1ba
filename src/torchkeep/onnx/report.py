"""What an ONNX export did and how close its numbers came to eager PyTorch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__

REPORT_KEY = "torchkeep.report"
"""The ``metadata_props`` key under which the verification report is stored in the file."""

TABLE_COLUMNS = ("batch", "output", "shape", "max abs diff", "max rel diff", "ok")
LENGTHS_COLUMN = "lengths"
"""The column after ``batch`` when a file has symbolic non-batch dimensions (a sequence)."""


@dataclass(frozen=True)
class OutputDiff:
    """One output at one batch size: onnxruntime against eager PyTorch.

    ``max_rel_diff`` is ``|onnx - torch| / |torch|`` over the elements whose reference is larger
    than ``atol`` (relative error means nothing next to zero); ``ok`` is ``torch.isclose``
    semantics: every element satisfies ``|onnx - torch| <= atol + rtol * |torch|``.
    """

    batch_size: int
    output: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    ok: bool
    lengths: str = ""
    """Sizes of the file's symbolic non-batch dimensions in this case, in name order ("8,5");
    empty when it has none."""

    def row(self, *, lengths: bool = False) -> tuple[str, ...]:
        """The cells of this diff in :func:`table_columns` order."""
        return (
            str(self.batch_size),
            *((self.lengths,) if lengths else ()),
            self.output,
            "x".join(map(str, self.shape)) or "scalar",
            f"{self.max_abs_diff:.3g}",
            f"{self.max_rel_diff:.3g}",
            "yes" if self.ok else "NO",
        )


def has_lengths(diffs: Sequence[OutputDiff]) -> bool:
    """True when some case changed a non-batch dimension (the table gets a lengths column)."""
    return any(d.lengths for d in diffs)


def table_columns(diffs: Sequence[OutputDiff]) -> tuple[str, ...]:
    """:data:`TABLE_COLUMNS`, with :data:`LENGTHS_COLUMN` after ``batch`` when needed."""
    if not has_lengths(diffs):
        return TABLE_COLUMNS
    return (TABLE_COLUMNS[0], LENGTHS_COLUMN, *TABLE_COLUMNS[1:])


def format_table(diffs: Sequence[OutputDiff]) -> str:
    """The diffs as a plain-text table (for error messages and logs)."""
    columns = table_columns(diffs)
    rows = [columns, *(d.row(lengths=has_lengths(diffs)) for d in diffs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@dataclass
class OnnxReport:
    """What :func:`torchkeep.export_onnx` wrote and what verification measured.

    Attributes:
        path: the ``.onnx`` file written.
        exporter: ``"dynamo"`` (``torch.onnx.export(..., dynamo=True)``) or ``"torchscript"``
            when the dynamo path failed and the legacy exporter was used instead.
        fallback_reason: why the dynamo path failed, when ``exporter`` is ``"torchscript"``.
        opset: the ONNX opset of the default domain.
        inputs: the graph's input names, in argument order.
        outputs: the graph's output names, in the order of the flattened model outputs.
        dynamic_batch: whether the first dimension of every input is dynamic in the file.
        export_batch_size: the batch size traced at export (2 when the example had batch 1).
        dynamic_axes: per graph input, its symbolic dimensions in the file (axis -> name, e.g.
            ``{"input_ids": {0: "batch", 1: "sequence"}}``).
        batch_sizes: the batch sizes verified in onnxruntime (empty without verification).
        lengths: the sizes of symbolic non-batch dimensions verified besides the example's,
            one mapping per case (``[{"sequence": 5}]``).
        input_values: per input, what verification fed it (``"random integers in [0, 100)
            (config.vocab_size)"``, ``"standard normal values"``).
        notes: what torchkeep changed for the export (``use_cache`` turned off).
        diffs: one entry per output and verified batch size.
        rtol: relative tolerance used by the verification.
        atol: absolute tolerance used by the verification.
        external_data: names of the external data files next to ``path`` (empty when inline).
        size: bytes on disk, external data included.
        export_seconds: time spent exporting.
        verify_seconds: time spent checking and verifying.
    """

    path: Path
    exporter: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    dynamic_batch: bool
    export_batch_size: int
    rtol: float
    atol: float
    fallback_reason: str | None = None
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = ()
    lengths: list[dict[str, int]] = field(default_factory=list)
    input_values: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    diffs: list[OutputDiff] = field(default_factory=list)
    external_data: list[str] = field(default_factory=list)
    size: int = 0
    export_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def verified(self) -> bool:
        """True when the file was run in onnxruntime and compared with eager PyTorch."""
        return bool(self.diffs)

    @property
    def ok(self) -> bool:
        """True when verified and every output is within tolerance at every batch size."""
        return self.verified and all(d.ok for d in self.diffs)

    def max_diffs(self) -> dict[str, dict[str, float]]:
        """Per output, the largest absolute and relative difference over all batch sizes."""
        result: dict[str, dict[str, float]] = {}
        for d in self.diffs:
            entry = result.setdefault(d.output, {"max_abs_diff": 0.0, "max_rel_diff": 0.0})
            entry["max_abs_diff"] = max(entry["max_abs_diff"], d.max_abs_diff)
            entry["max_rel_diff"] = max(entry["max_rel_diff"], d.max_rel_diff)
        return result

    def metadata(self) -> dict[str, str]:
        """The ``metadata_props`` torchkeep stores in the ``.onnx`` file."""
        stored = {
            "producer": f"torchkeep {__version__}",
            "torch_version": torch.__version__,
            "exporter": self.exporter,
            "fallback_reason": self.fallback_reason,
            "opset": self.opset,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "dynamic_batch": self.dynamic_batch,
            "export_batch_size": self.export_batch_size,
            "verified_batch_sizes": list(self.batch_sizes),
            "dynamic_axes": {
                name: {str(axis): dim for axis, dim in axes.items()}
                for name, axes in self.dynamic_axes.items()
            },
            "verified_lengths": self.lengths,
            "input_values": self.input_values,
            "notes": self.notes,
            "rtol": self.rtol,
            "atol": self.atol,
            "max_diffs": self.max_diffs(),
        }
        return {REPORT_KEY: json.dumps(stored, sort_keys=True)}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the report."""
        value = asdict(self)
        value["path"] = str(self.path)
        value["verified"] = self.verified
        value["ok"] = self.ok
        return value

    def __str__(self) -> str:
        batch = "dynamic batch" if self.dynamic_batch else "fixed batch"
        head = f"{self.path.name}: opset {self.opset}, {self.exporter} exporter, {batch}"
        if not self.verified:
            return f"{head}, not verified"
        sizes = ", ".join(map(str, self.batch_sizes))
        verdict = "within" if self.ok else "OUTSIDE"
        extra = "".join(f"\n{line}" for line in self.details())
        return (
            f"{head}, verified at batch sizes {sizes}: {verdict} rtol={self.rtol:g} "
            f"atol={self.atol:g}{extra}\n{format_table(self.diffs)}"
        )

    def details(self) -> list[str]:
        """Lines on dynamic non-batch dimensions, the values fed to each input, and notes."""
        lines = []
        other = sorted({n for axes in self.dynamic_axes.values() for a, n in axes.items() if a})
        if other:
            lines.append(f"dynamic dimensions besides the batch: {', '.join(other)}")
        lines += [
            f"input {name}: {values}"
            for name, values in self.input_values.items()
            if values != "standard normal values"
        ]
        return lines + [f"note: {note}" for note in self.notes]
