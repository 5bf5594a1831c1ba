"""Export a model to ONNX, verify it in onnxruntime at several batch sizes, print the table."""

from __future__ import annotations

import argparse
import importlib
import json
import math
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
from ..onnx import OnnxReport, export_onnx
from ..onnx.report import TABLE_COLUMNS
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


def input_spec(text: str) -> torch.Tensor:
    """``"1,3,32,32"`` or ``"4,16:int64"`` -> an example tensor of that shape and dtype."""
    shape_text, _, dtype_name = text.partition(":")
    dtype = getattr(torch, dtype_name or "float32", None)
    try:
        shape = [int(part) for part in shape_text.split(",") if part.strip()]
    except ValueError:
        shape = []
    if not shape or min(shape) < 1 or not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give positive sizes separated by commas, optionally ':dtype' "
            "(e.g. 1,3,32,32 or 4,16:int64)"
        )
    if math.prod(shape) > MAX_NUMEL:  # the bound a bundle's recorded example inputs have
        raise argparse.ArgumentTypeError(
            f"{text!r}: {math.prod(shape):,} elements; an example input holds at most "
            f"{MAX_NUMEL:,} (a small batch is enough to export)"
        )
    return example_tensor(shape, dtype)


def example_tensor(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Random floats, or zeros for integer and bool dtypes, of ``shape``."""
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="the model: module:Class (or module:factory function) to build it, then --weights",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
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
        help="shape of one example input, e.g. 1,3,32,32 (repeat once per input; int dtypes "
        "give zeros); a bundle saved with example_inputs defaults to their shapes",
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
        rows = [diff.row() for diff in report.diffs]
        title = f"onnxruntime vs PyTorch (rtol={report.rtol:g}, atol={report.atol:g})"
        numeric = ("batch", "max abs diff", "max rel diff")
        print_table(title, TABLE_COLUMNS, rows, right_align=numeric)
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


def _example_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """``--input-shape`` values, else the shapes a bundle recorded at save time."""
    if args.input_shape:
        return tuple(args.input_shape)
    if Path(args.source).is_dir():
        specs = example_input_specs(args.source)
        if specs:
            return tuple(example_tensor(shape, dtype) for shape, dtype in specs)
    raise ExportError(
        f"{args.source}: no example input shapes are known; give --input-shape (e.g. 1,3,32,32)"
    )


def run(args: argparse.Namespace) -> int:
    example_inputs = _example_inputs(args)
    model = load_source(args.source, weights=args.weights, init_kwargs=args.init_kwargs)
    try:
        report = export_onnx(
            model,
            example_inputs,
            args.output,
            dynamic_batch=not args.static_batch,
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
