"""Small read-only questions about an ONNX graph: shapes, opset, ops used."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


def value_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """The dimensions of a graph input or output: ints, symbolic names, or ``"?"``."""
    dims: list[int | str] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or "?")
    return dims


def has_dynamic_batch(model: onnx.ModelProto) -> bool:
    """True when every input with a dimension has a symbolic first dimension (and one does)."""
    firsts = [value_dims(v)[0] for v in model.graph.input if value_dims(v)]
    return bool(firsts) and all(isinstance(first, str) for first in firsts)


def default_opset(model: onnx.ModelProto) -> int:
    """The opset version of the default (``ai.onnx``) domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and, recursively, the subgraphs of its nodes (``If``, ``Loop``, ``Scan``)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from all_graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from all_graphs(subgraph)


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """How often each op type occurs, subgraphs and local functions included (``domain::Op``)."""
    counts: Counter[str] = Counter()
    nodes = [node for graph in all_graphs(model.graph) for node in graph.node]
    nodes += [node for function in model.functions for node in function.node]
    for node in nodes:
        counts[f"{node.domain}::{node.op_type}" if node.domain else node.op_type] += 1
    return counts


def dynamic_axes(model: onnx.ModelProto) -> dict[str, dict[int, str]]:
    """Per graph input, its symbolic dimensions: ``{"input_ids": {0: "batch", 1: "sequence"}}``."""
    axes = {}
    for value in model.graph.input:
        symbolic = {i: d for i, d in enumerate(value_dims(value)) if isinstance(d, str)}
        if symbolic:
            axes[value.name] = symbolic
    return axes


def name_dynamic_axes(model: onnx.ModelProto, wanted: dict[str, dict[int, str]]) -> None:
    """Rename the symbolic dimensions of ``model`` to the names planned for its inputs.

    The exporter names them itself when the inputs line up with its ``dynamic_shapes``; with an
    absent (``None``) argument it leaves symbols such as ``s77``. Each symbol an input carries at a
    planned axis is renamed everywhere it occurs (inputs, outputs, intermediate values), unless
    that would merge two symbols into one name.
    """
    renames: dict[str, str] = {}
    for value in model.graph.input:
        for axis, symbol in enumerate(value_dims(value)):
            target = wanted.get(value.name, {}).get(axis)
            if isinstance(symbol, str) and target and renames.setdefault(symbol, target) != target:
                return
    if len(set(renames.values())) != len(renames) or not renames:
        return
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
