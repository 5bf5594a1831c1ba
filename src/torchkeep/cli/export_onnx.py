"""Export a model to ONNX, verify it in onnxruntime at several batch sizes, print the table."""

from __future__ import annotations

import argparse
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import (
    ExportError,
    ExportVerificationError,
    InitArgsError,
    ModelClassNotFoundError,
)
from ..model import load_model
from ..model.bundle import example_input_specs
from ..model.classpath import class_path_problem
from ..model.config import MAX_NUMEL
from ..model.tracing import example_call
from ..onnx import OnnxReport, export_onnx
from ..onnx.exporter import default_input_names
from ..onnx.ranges import integer_ranges, random_values
from ..onnx.report import has_lengths, table_columns
from ..weights import load_weights
from ._output import (
    EXIT_OK,
    EXIT_PROBLEM,
    console,
    human_bytes,
    labelled,
    plain,
    print_error,
    print_json,
    print_table,
    tolerance,
)
from ._remote import location


@dataclass(frozen=True)
class InputSpec:
    """One ``--input-shape``: an optional keyword, a shape and a dtype."""

    name: str | None
    shape: list[int]
    dtype: torch.dtype


def input_spec(text: str) -> InputSpec:
    """``"1,3,32,32"``, ``"4,16:int64"`` or ``"input_ids=1,8:int64"`` (a keyword input)."""
    keyword, sep, rest = text.partition("=")
    name = keyword.strip() if sep else None
    if name is not None and not name.isidentifier():
        raise argparse.ArgumentTypeError(
            f"{text!r}: a keyword input is NAME=SHAPE[:DTYPE] with NAME a Python identifier "
            "(e.g. input_ids=1,8:int64)"
        )
    shape_text, _, dtype_name = (rest if sep else text).partition(":")
    dtype = getattr(torch, dtype_name or "float32", None)
    try:
        shape = [int(part) for part in shape_text.split(",") if part.strip()]
    except ValueError:
        shape = []
    if not shape or min(shape) < 1 or not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give positive sizes separated by commas, optionally ':dtype' and a "
            "leading 'name=' for a keyword input (e.g. 1,3,32,32 or input_ids=4,16:int64)"
        )
    if math.prod(shape) > MAX_NUMEL:  # the bound a bundle's recorded example inputs have
        raise argparse.ArgumentTypeError(
            f"{text!r}: {math.prod(shape):,} elements; an example input holds at most "
            f"{MAX_NUMEL:,} (a small batch is enough to export)"
        )
    return InputSpec(name, shape, dtype)


def input_range(text: str) -> tuple[str, tuple[int, int]]:
    """``"input_ids=0:50257"`` -> ``("input_ids", (0, 50257))`` (the high end excluded)."""
    name, _, bounds = text.partition("=")
    low, _, high = bounds.partition(":")
    try:
        values = (int(low), int(high))
    except ValueError:
        values = (0, 0)
    if not name or values[0] >= values[1]:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give NAME=LOW:HIGH with integers LOW < HIGH (HIGH excluded), e.g. "
            "input_ids=0:50257"
        )
    return name, values


def example_tensor(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Random floats, or zeros for integer and bool dtypes, of ``shape`` (the integers are
    replaced by random values in their range once the model is known, see :func:`_fill`)."""
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="the model: module:Class (or module:factory function) to build it, then --weights",
    )
    parser.add_argument(
        "-o", "--output", type=location, required=True, help="the .onnx file to write (local)"
    )
    parser.add_argument(
        "--weights", type=Path, help="weights loaded into the model (safetensors or torch.save)"
    )
    parser.add_argument(
        "--init-kwargs",
        type=json.loads,
        default={},
        help="JSON keyword arguments for module:Class, e.g. '{\"num_classes\": 10}'",
    )
    parser.add_argument(
        "--input-shape",
        type=input_spec,
        action="append",
        metavar="SHAPE[:DTYPE]",
        help="shape of one example input, e.g. 1,3,32,32; NAME=SHAPE[:DTYPE] passes it by "
        "keyword (input_ids=1,8:int64). Repeat once per input; integer inputs get random "
        "values in their range (--input-range, else derived from the model); a bundle saved "
        "with example_inputs defaults to their shapes",
    )
    parser.add_argument(
        "--input-range",
        type=input_range,
        action="append",
        default=[],
        metavar="NAME=LOW:HIGH",
        help="values of an integer input (HIGH excluded), e.g. input_ids=0:50257; default: "
        "from the model (config.vocab_size, its only embedding)",
    )
    parser.add_argument(
        "--static-sequence",
        action="store_true",
        help="keep the sequence length of integer inputs fixed (dynamic by default)",
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    parser.add_argument("--static-batch", action="store_true", help="keep the batch size fixed")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    parser.add_argument("--rtol", type=tolerance, default=1e-3, help="relative tolerance")
    parser.add_argument("--atol", type=tolerance, default=1e-5, help="absolute tolerance")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _import_model(source: str, init_kwargs: dict[str, object]) -> nn.Module:
    module_name, _, attribute = source.partition(":")
    problem = class_path_problem(f"{module_name}.{attribute}")
    if problem is not None:
        raise ModelClassNotFoundError(
            f"{source!r} is not module:Class ({problem}); give an absolute module path, e.g. "
            "torchkeep.models:Net"
        )
    try:
        # The user names this module on their own command line: their installed code.
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelClassNotFoundError(
            f"cannot import {attribute or '?'} from {module_name!r}: {exc}. Give SOURCE as "
            "module:Class with the module importable (check PYTHONPATH)"
        ) from exc
    if not isinstance(init_kwargs, dict):
        raise InitArgsError(f"--init-kwargs must be a JSON object, not {init_kwargs!r:.60}")
    try:
        model = factory(**init_kwargs)
    except Exception as exc:  # the user's own factory rejected the arguments
        raise InitArgsError(
            f"{source}(**{init_kwargs!r:.80}) raised {type(exc).__name__}: {exc}; check "
            "--init-kwargs"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelClassNotFoundError(f"{source} built a {type(model).__name__}, not a Module")
    return model


def load_source(
    source: str, *, weights: Path | None = None, init_kwargs: dict[str, object] | None = None
) -> nn.Module:
    """The model named by ``source``: a bundle directory, or ``module:Class`` plus weights."""
    if Path(source).is_dir():
        return load_model(source)
    if ":" not in source:
        raise ModelClassNotFoundError(f"{source!r}: give module:Class (e.g. torchkeep.models:Net)")
    model = _import_model(source, init_kwargs or {})
    if weights is not None:
        load_weights(model, weights)
    return model


def print_report(report: OnnxReport) -> None:
    """The verification table and a one-line summary of what was written."""
    if report.verified:
        rows = [diff.row(lengths=has_lengths(report.diffs)) for diff in report.diffs]
        title = f"onnxruntime vs PyTorch (rtol={report.rtol:g}, atol={report.atol:g})"
        numeric = ("batch", "max abs diff", "max rel diff")
        print_table(title, table_columns(report.diffs), rows, right_align=numeric)
    for line in report.details():
        console.print(plain(line))
    batch = "dynamic batch" if report.dynamic_batch else "fixed batch"
    data = f", data in {', '.join(report.external_data)}" if report.external_data else ""
    console.print(
        plain(
            f"wrote {report.path} ({human_bytes(report.size)}{data}): "
            f"opset {report.opset}, {report.exporter} exporter, {batch}; "
            f"export {report.export_seconds:.1f}s, checks {report.verify_seconds:.1f}s"
        )
    )
    if report.fallback_reason:  # torch's message may quote names from the model or the file
        label = "dynamo export failed, used TorchScript: "
        console.print(labelled(label, report.fallback_reason, style="yellow"))
    if not report.verified:
        console.print("[yellow]not verified[/] (--no-verify)")


def _example_inputs(args: argparse.Namespace) -> list[InputSpec]:
    """``--input-shape`` values, else the shapes a bundle recorded at save time."""
    if args.input_shape:
        return list(args.input_shape)
    if Path(args.source).is_dir():
        specs = example_input_specs(args.source)
        if specs:
            return [InputSpec(None, shape, dtype) for shape, dtype in specs]
    raise ExportError(
        f"{args.source}: no example input shapes are known; give --input-shape (e.g. 1,3,32,32)"
    )


def _fill(
    model: nn.Module, specs: list[InputSpec], declared: dict[str, tuple[int, int]]
) -> dict[str, torch.Tensor] | tuple[torch.Tensor, ...]:
    """The example inputs: keyword ones as a dict (when any has a name), else positional; integer
    inputs drawn at random from their range, so the trace never sees only zeros."""
    keyword = [spec.name for spec in specs if spec.name is not None]
    if keyword and len(keyword) != len(specs):
        raise ExportError(
            "give every --input-shape a NAME= (keyword inputs) or none (positional inputs)"
        )
    if len(set(keyword)) != len(keyword):
        raise ExportError(f"--input-shape names repeat: {', '.join(keyword)}")
    tensors = [example_tensor(spec.shape, spec.dtype) for spec in specs]
    call = (
        example_call(model, dict(zip(keyword, tensors, strict=True)))
        if keyword
        else example_call(model, tuple(tensors))
    )
    names = default_input_names(call)
    ranges = integer_ranges(model, names, call.tensors(), declared)
    generator = torch.Generator().manual_seed(0)
    filled = [
        random_values(list(x.shape), x, ranges.get(name), generator) if name in ranges else x
        for name, x in zip(names, call.tensors(), strict=True)
    ]
    call = call.with_tensors(filled)
    return call.kwargs if keyword else tuple(t for t in call.args if t is not None)


def run(args: argparse.Namespace) -> int:
    specs = _example_inputs(args)
    model = load_source(args.source, weights=args.weights, init_kwargs=args.init_kwargs)
    declared = dict(args.input_range)
    example_inputs = _fill(model, specs, declared)
    try:
        report = export_onnx(
            model,
            example_inputs,
            args.output,
            dynamic_batch=not args.static_batch,
            dynamic_sequence=False if args.static_sequence else None,
            input_ranges=declared or None,
            opset=args.opset,
            verify=not args.no_verify,
            rtol=args.rtol,
            atol=args.atol,
        )
    except ExportVerificationError as exc:
        print_error(str(exc))
        return EXIT_PROBLEM
    if args.json:
        print_json(report.to_json())
    else:
        print_report(report)
    return EXIT_OK
