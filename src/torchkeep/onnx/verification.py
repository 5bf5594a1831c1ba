"""Run an exported file in onnxruntime on fresh inputs and compare it with eager PyTorch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportVerificationError
from ._deps import require
from .files import load_model
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


def random_like(example: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A fresh random tensor shaped like ``example`` with its first dimension ``batch_size``.

    Floats are standard normal; integers stay within the example's value range (token ids and
    class indices must stay valid); booleans are fair coin flips. 0-d tensors keep their shape.
    """
    shape = (batch_size, *example.shape[1:]) if example.dim() else ()
    if example.is_floating_point() or example.is_complex():
        return torch.randn(shape, generator=generator, dtype=example.dtype)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    low = int(example.min()) if example.numel() else 0
    high = int(example.max()) + 1 if example.numel() else 1
    return torch.randint(low, high, shape, generator=generator, dtype=example.dtype)


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


def verify_file(
    path: Path,
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    batch_sizes: Sequence[int],
    rtol: float,
    atol: float,
    seed: int = 0,
) -> list[OutputDiff]:
    """Run ``path`` in onnxruntime at each batch size on fresh random inputs against ``model``.

    Args:
        path: the ``.onnx`` file.
        model: the PyTorch model it was exported from (run in eval mode).
        example_inputs: tensors shaped like the model's inputs.
        input_names: the graph's input names, one per example input.
        output_names: the graph's output names, one per flattened model output.
        batch_sizes: the first-dimension sizes to try.
        rtol: relative tolerance.
        atol: absolute tolerance.
        seed: seed of the random inputs.

    Returns:
        One :class:`OutputDiff` per batch size and output (the caller judges them).

    Raises:
        ExportVerificationError: onnxruntime cannot run the file at one of the batch sizes.

    Example:
        >>> verify_file(path, net, (x,), input_names=["input"], output_names=["output"],
        ...             batch_sizes=(1, 2, 7), rtol=1e-3, atol=1e-5)
    """
    session = _session(path)
    wanted = {value.name for value in session.get_inputs()}
    generator = torch.Generator().manual_seed(seed)
    diffs = []
    with eval_mode(model), torch.no_grad():
        for batch_size in batch_sizes:
            inputs = [random_like(x, batch_size, generator) for x in example_inputs]
            expected = flatten_tensors(model(*inputs))
            named = zip(input_names, inputs, strict=True)
            feeds = {name: x.numpy() for name, x in named if name in wanted}
            try:
                results = session.run(list(output_names), feeds)
            except Exception as exc:  # onnxruntime raises its own untyped exception classes
                raise ExportVerificationError(
                    f"{path}: onnxruntime cannot run the exported model at batch size "
                    f"{batch_size}: {exc}"
                ) from exc
            for name, result, reference in zip(output_names, results, expected, strict=True):
                actual = torch.from_numpy(result)
                max_abs, max_rel, ok = compare(actual, reference, rtol=rtol, atol=atol)
                diffs.append(
                    OutputDiff(batch_size, name, tuple(actual.shape), max_abs, max_rel, ok)
                )
    return diffs
