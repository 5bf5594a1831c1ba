"""``inspect`` for ``.onnx`` files: graph signature, opset, size, ops and the stored report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..describe import Description, TensorInfo
from ..formats import Format
from ._deps import require
from .files import check_external_data, load_model
from .graph import default_opset, has_dynamic_batch, op_counts, value_dims
from .report import REPORT_KEY

if TYPE_CHECKING:
    import onnx


def _dtype_name(data_type: int) -> str:
    import onnx

    return str(onnx.TensorProto.DataType.Name(data_type)).lower()


def _tensor_info(tensor: onnx.TensorProto) -> TensorInfo:
    import onnx

    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):  # string and exotic types have no fixed size
        itemsize = 0
    shape = tuple(int(d) for d in tensor.dims)
    nbytes = math.prod(shape) * itemsize
    return TensorInfo(tensor.name, _dtype_name(tensor.data_type), shape, nbytes)


def _signature(values: Any) -> list[tuple[str, str]]:
    rows = []
    for value in values:
        dims = ", ".join(map(str, value_dims(value)))
        rows.append((value.name, f"{_dtype_name(value.type.tensor_type.elem_type)}[{dims}]"))
    return rows


def _report_rows(text: str) -> list[tuple[str, str]]:
    stored = json.loads(text)
    rows = [
        ("producer", str(stored.get("producer"))),
        ("torch version", str(stored.get("torch_version"))),
        ("exporter", str(stored.get("exporter"))),
        ("opset", str(stored.get("opset"))),
    ]
    sizes = stored.get("verified_batch_sizes") or []
    rows.append(("verified batch sizes", ", ".join(map(str, sizes)) or "not verified"))
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
    description.tensors = [_tensor_info(t) for t in model.graph.initializer]
    properties = {p.key: p.value for p in model.metadata_props}
    report = properties.pop(REPORT_KEY, None)
    description.metadata = properties
    description.sections["model"] = [
        ("opset", str(default_opset(model))),
        ("ir version", str(model.ir_version)),
        ("producer", f"{model.producer_name} {model.producer_version}".strip()),
        ("dynamic batch", "yes" if has_dynamic_batch(model) else "no"),
        ("external data", ", ".join(f.name for f in data_files) or "none"),
    ]
    description.sections["inputs"] = _signature(model.graph.input)
    description.sections["outputs"] = _signature(model.graph.output)
    description.sections["ops"] = [(op, str(n)) for op, n in sorted(op_counts(model).items())]
    if report is None:
        description.notes.append("no torchkeep verification report: not written by export_onnx")
        return description
    try:
        description.sections["verification"] = _report_rows(report)
    except (ValueError, TypeError, KeyError, AttributeError):
        description.notes.append(f"the stored {REPORT_KEY} is not a readable report")
    return description
