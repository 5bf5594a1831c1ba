"""What an ONNX export did and how close its numbers came to eager PyTorch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..format_versions import ONNX_REPORT

REPORT_KEY = "torchkeep.report"
"""The ``metadata_props`` key under which the verification report is stored in the file."""

TABLE_COLUMNS = ("batch", "output", "shape", "max abs diff", "max rel diff", "ok")


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

    def row(self) -> tuple[str, ...]:
        """The cells of this diff in :data:`TABLE_COLUMNS` order."""
        return (
            str(self.batch_size),
            self.output,
            "x".join(map(str, self.shape)) or "scalar",
            f"{self.max_abs_diff:.3g}",
            f"{self.max_rel_diff:.3g}",
            "yes" if self.ok else "NO",
        )


def format_table(diffs: Sequence[OutputDiff]) -> str:
    """The diffs as a plain-text table (for error messages and logs)."""
    rows = [TABLE_COLUMNS, *(d.row() for d in diffs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
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
        batch_sizes: the batch sizes verified in onnxruntime (empty without verification).
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
    batch_sizes: tuple[int, ...] = ()
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
            "format_version": ONNX_REPORT.writes,
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
        return (
            f"{head}, verified at batch sizes {sizes}: {verdict} rtol={self.rtol:g} "
            f"atol={self.atol:g}\n{format_table(self.diffs)}"
        )
