"""``inspect`` for ``.onnx`` files: graph signature, opset, size, ops and the stored report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..describe import Description, TensorInfo
from ..errors import CorruptFileError
from ..formats import Format
from ._deps import require
from .files import check_external_data, load_model
from .graph import default_opset, has_dynamic_batch, op_counts, value_dims
from .report import REPORT_KEY
from .stored_report import parse_stored_report

if TYPE_CHECKING:
    import onnx


MAX_RANK = 1024
"""The most dimensions a tensor may declare (no runtime supports more; bounds the memory
``inspect`` spends on a hostile file)."""


def _dtype_name(data_type: int, *, path: Path, where: str) -> str:
    import onnx

    try:
        return str(onnx.TensorProto.DataType.Name(data_type)).lower()
    except ValueError:
        raise CorruptFileError(
            f"{path}: {where} has data type {data_type}, which onnx {onnx.__version__} does "
            "not define: the file is damaged, or written by a newer ONNX (upgrade onnx)"
        ) from None


def _check_rank(rank: int, *, path: Path, where: str) -> None:
    if rank > MAX_RANK:
        raise CorruptFileError(f"{path}: {where} declares {rank:,} dimensions (> {MAX_RANK})")


def _dims(dims: Sequence[int], *, path: Path, where: str) -> tuple[int, ...]:
    _check_rank(len(dims), path=path, where=where)
    if any(d < 0 for d in dims):
        raise CorruptFileError(f"{path}: {where} has a negative dimension {list(dims)}")
    return tuple(dims)


def _tensor_info(tensor: onnx.TensorProto, path: Path) -> TensorInfo:
    import onnx

    where = f"initializer {tensor.name!r}"
    dtype = _dtype_name(tensor.data_type, path=path, where=where)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):  # string and exotic types have no fixed size
        itemsize = 0
    shape = _dims(tensor.dims, path=path, where=where)
    return TensorInfo(tensor.name, dtype, shape, math.prod(shape) * itemsize)


def _signature(values: Any, path: Path, kind: str) -> list[tuple[str, str]]:
    rows = []
    for value in values:
        where = f"graph {kind} {value.name!r}"
        dtype = _dtype_name(value.type.tensor_type.elem_type, path=path, where=where)
        _check_rank(len(value.type.tensor_type.shape.dim), path=path, where=where)
        rows.append((value.name, f"{dtype}[{', '.join(map(str, value_dims(value)))}]"))
    return rows


def _report_rows(text: str, path: Path) -> list[tuple[str, str]]:
    stored = parse_stored_report(text, path=path)
    rows = [
        ("producer", str(stored.get("producer"))),
        ("torch version", str(stored.get("torch_version"))),
        ("exporter", str(stored.get("exporter"))),
        ("opset", str(stored.get("opset"))),
    ]
    sizes = stored.get("verified_batch_sizes") or []
    rows.append(("verified batch sizes", ", ".join(map(str, sizes)) or "not verified"))
    for lengths in stored.get("verified_lengths") or []:
        sizes_text = ", ".join(f"{name}={size}" for name, size in sorted(lengths.items()))
        rows.append(("verified lengths", sizes_text))
    rows.extend((f"input {n}", values) for n, values in (stored.get("input_values") or {}).items())
    rows.extend(("note", note) for note in stored.get("notes") or [])
    rows.append(("tolerance", f"rtol={stored.get('rtol')} atol={stored.get('atol')}"))
    for output, diffs in (stored.get("max_diffs") or {}).items():
        rows.append(
            (
                f"max diff {output}",
                f"abs {diffs['max_abs_diff']:.3g}, rel {diffs['max_rel_diff']:.3g}",
            )
        )
    return rows


def describe_onnx(path: Path) -> Description:
    """Describe an ``.onnx`` file without reading its external tensor data.

    Args:
        path: the ``.onnx`` file (external data, if any, must sit in its folder).

    Returns:
        A :class:`~torchkeep.describe.Description` with sections ``model``, ``inputs``,
        ``outputs``, ``ops`` and, for files written by :func:`torchkeep.export_onnx`,
        ``verification``.

    Example:
        >>> describe_onnx(Path("net.onnx")).sections["inputs"]
        [('input', 'float[batch, 3, 32, 32]')]
    """
    require("onnx", feature="inspecting an ONNX file")
    model = load_model(path)
    data_files = check_external_data(path, model)
    size = path.stat().st_size + sum(f.stat().st_size for f in data_files)
    description = Description(path, Format.ONNX, size)
    description.tensors = [_tensor_info(t, path) for t in model.graph.initializer]
    properties = {p.key: p.value for p in model.metadata_props}
    reports = [p.value for p in model.metadata_props if p.key == REPORT_KEY]
    properties.pop(REPORT_KEY, None)
    description.metadata = properties
    description.sections["model"] = [
        ("opset", str(default_opset(model))),
        ("ir version", str(model.ir_version)),
        ("producer", f"{model.producer_name} {model.producer_version}".strip()),
        ("dynamic batch", "yes" if has_dynamic_batch(model) else "no"),
        ("external data", ", ".join(f.name for f in data_files) or "none"),
    ]
    description.sections["inputs"] = _signature(model.graph.input, path, "input")
    description.sections["outputs"] = _signature(model.graph.output, path, "output")
    description.sections["ops"] = [(op, str(n)) for op, n in sorted(op_counts(model).items())]
    if not reports:
        description.notes.append("no torchkeep verification report: not written by export_onnx")
    elif len(reports) > 1:
        description.notes.append(
            f"{len(reports)} entries named {REPORT_KEY!r}: readers disagree on which one "
            "counts, so none is shown"
        )
    else:
        try:
            description.sections["verification"] = _report_rows(reports[0], path)
        except CorruptFileError as exc:  # the model is still described; its report is not
            description.notes.append(str(exc))
    return description
