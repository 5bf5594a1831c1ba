"""Run an exported file in onnxruntime on fresh inputs and compare it with eager PyTorch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportVerificationError
from ..model.tracing import ExampleCall
from ._deps import require
from .files import load_model
from .ranges import InputRange, integer_ranges, random_values
from .report import OutputDiff


def verification_batch_sizes(export_batch_size: int) -> tuple[int, ...]:
    """Batch sizes a dynamic-batch export is checked at: 1, the exported one, a larger odd one."""
    return tuple(sorted({1, export_batch_size, 2 * export_batch_size + 3}))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def flatten_tensors(value: object) -> list[torch.Tensor]:
    """The tensors of a nested output (tuples, lists, dict values) in export order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in flatten_tensors(item)]
    return []


def compare(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float
) -> tuple[float, float, bool]:
    """Max absolute and relative difference, and whether every element is within tolerance."""
    if actual.shape != expected.shape:
        return math.inf, math.inf, False
    a, e = actual.double(), expected.detach().double()
    diff = (a - e).abs()
    same = (a == e) | (a.isnan() & e.isnan())
    diff = torch.where(same, torch.zeros_like(diff), diff.nan_to_num(nan=float("inf")))
    if not diff.numel():
        return 0.0, 0.0, True
    significant = e.abs() > atol
    relative = diff[significant] / e.abs()[significant]
    max_rel = float(relative.max()) if relative.numel() else 0.0
    ok = bool((diff <= atol + rtol * e.abs().nan_to_num(nan=0.0)).all())
    return float(diff.max()), max_rel, ok


def _session(path: Path) -> Any:
    (ort,) = require("onnxruntime", feature="verifying an ONNX export")
    load_model(path)  # refuses external data outside the folder before onnxruntime reads it
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _shape(
    example: torch.Tensor, dims: Sequence[object], batch_size: int, lengths: Mapping[str, int]
) -> list[int]:
    """``example``'s shape with its dynamic dimensions set: a symbolic first dimension (the batch)
    to ``batch_size``, any other symbolic one to its size in ``lengths`` (else the example's)."""
    shape = list(example.shape)
    for axis, dim in enumerate(dims[: len(shape)]):
        if axis == 0 and isinstance(dim, str):
            shape[0] = batch_size
        elif isinstance(dim, str) and dim in lengths:
            shape[axis] = lengths[dim]
    return shape


def _lengths_label(inputs: Sequence[torch.Tensor], dims: Sequence[Sequence[object]]) -> str:
    """The sizes of the symbolic non-batch dimensions in this case, in name order (``"8,5"``)."""
    sizes: dict[str, int] = {}
    for tensor, tensor_dims in zip(inputs, dims, strict=True):
        for axis, dim in enumerate(tensor_dims[: tensor.dim()]):
            if axis and isinstance(dim, str):
                sizes.setdefault(dim, tensor.shape[axis])
    return ",".join(str(sizes[name]) for name in sorted(sizes))


def verify_file(
    path: Path,
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | ExampleCall,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    batch_sizes: Sequence[int],
    rtol: float,
    atol: float,
    seed: int = 0,
    lengths: Sequence[Mapping[str, int]] = (),
    ranges: Mapping[str, InputRange] | None = None,
) -> list[OutputDiff]:
    """Run ``path`` in onnxruntime on fresh random inputs and compare it with ``model``.

    Each batch size is run with the example's other sizes; then each entry of ``lengths``
    (sizes of the file's symbolic non-batch dimensions, e.g. ``{"sequence": 5}``) is run at the
    middle batch size. Integer inputs are drawn from ``ranges`` (by input name; default: what
    :func:`~torchkeep.onnx.ranges.integer_ranges` derives from the model and the example).

    Args:
        path: the ``.onnx`` file.
        model: the PyTorch model it was exported from (run in eval mode).
        example_inputs: tensors shaped like the model's positional inputs, or the example call.
        input_names: the graph's input names, one per example tensor.
        output_names: the graph's output names, one per flattened model output.
        batch_sizes: the first-dimension sizes to try.
        rtol: relative tolerance.
        atol: absolute tolerance.
        seed: seed of the random inputs.
        lengths: further cases: sizes of symbolic non-batch dimensions, by name.
        ranges: the value range of each integer input.

    Returns:
        One :class:`OutputDiff` per case and output (the caller judges them).

    Raises:
        ExportVerificationError: onnxruntime cannot run the file in one of the cases.
        ExportError: an integer input has no known range.

    Example:
        >>> verify_file(path, net, (x,), input_names=["input"], output_names=["output"],
        ...             batch_sizes=(1, 2, 7), rtol=1e-3, atol=1e-5)
    """
    call = (
        example_inputs
        if isinstance(example_inputs, ExampleCall)
        else ExampleCall(tuple(example_inputs))
    )
    examples = call.tensors()
    session = _session(path)
    dims = {value.name: list(value.shape) for value in session.get_inputs()}
    if ranges is None:
        ranges = integer_ranges(model, input_names, examples, None)
    generator = torch.Generator().manual_seed(seed)
    middle = batch_sizes[len(batch_sizes) // 2]
    cases: list[tuple[int, dict[str, int]]] = [(b, {}) for b in batch_sizes] + [
        (middle, dict(sizes)) for sizes in lengths
    ]
    diffs = []
    with eval_mode(model), torch.no_grad():
        for batch_size, sizes in cases:
            inputs = [
                random_values(
                    _shape(x, dims.get(name, []), batch_size, sizes), x, ranges.get(name), generator
                )
                for name, x in zip(input_names, examples, strict=True)
            ]
            expected = flatten_tensors(call.with_tensors(inputs).run(model))
            feeds = {n: x.numpy() for n, x in zip(input_names, inputs, strict=True) if n in dims}
            label = _lengths_label(inputs, [dims.get(name, []) for name in input_names])
            try:
                results = session.run(list(output_names), feeds)
            except Exception as exc:  # onnxruntime raises its own untyped exception classes
                at = f"batch size {batch_size}" + (f", sizes {sizes}" if sizes else "")
                raise ExportVerificationError(
                    f"{path}: onnxruntime cannot run the exported model at {at}: {exc}"
                ) from exc
            for name, result, reference in zip(output_names, results, expected, strict=True):
                actual = torch.from_numpy(result)
                max_abs, max_rel, ok = compare(actual, reference, rtol=rtol, atol=atol)
                diffs.append(
                    OutputDiff(batch_size, name, tuple(actual.shape), max_abs, max_rel, ok, label)
                )
    return diffs
