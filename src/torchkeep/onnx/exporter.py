"""``export_onnx``: export with the dynamo exporter, prove the file right, then write it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..compat import onnx_dynamo_export_available
from ..errors import ExportError, ExportVerificationError, first_line
from ..paths import write_target
from ._deps import EXPORT_PACKAGES, require
from .failures import explain, is_data_dependent
from .files import EXTERNAL_DATA_THRESHOLD, commit, save_staged, staging_folder
from .graph import default_opset, has_dynamic_batch
from .report import OnnxReport, format_table
from .verification import eval_mode, flatten_tensors, verification_batch_sizes, verify_file

if TYPE_CHECKING:
    import onnx

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def _as_inputs(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not all(
        isinstance(x, torch.Tensor) for x in inputs
    ):
        raise ExportError(
            f"example_inputs must be a tensor or a tuple of tensors (the positional arguments "
            f"of forward), not {type(example_inputs).__name__}"
        )
    return tuple(x.detach().cpu() for x in inputs)


def _reference_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The model's outputs on the example inputs; its own error (a shape its layers reject) is
    an :class:`ExportError` that names the inputs, not a raw exception from deep in torch."""
    try:
        with torch.no_grad():
            return flatten_tensors(model(*inputs))
    except Exception as exc:
        shapes = ", ".join(f"{list(x.shape)}:{str(x.dtype).removeprefix('torch.')}" for x in inputs)
        raise ExportError(
            f"{type(model).__name__} raised on the example inputs ({shapes}): "
            f"{type(exc).__name__}: {first_line(exc)}; pass inputs its forward accepts "
            "(--input-shape on the command line)"
        ) from exc


def _names(given: Sequence[str] | None, count: int, stem: str) -> list[str]:
    names = list(given) if given is not None else []
    if given is None:
        names = [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
    if len(names) != count or len(set(names)) != count:
        raise ExportError(
            f"{stem}_names={names!r} must give {count} distinct names, one per model {stem}"
        )
    return names


def _batch_plan(
    inputs: tuple[torch.Tensor, ...], dynamic_batch: bool
) -> tuple[tuple[torch.Tensor, ...], Any, int]:
    """The inputs to trace, their ``dynamic_shapes`` and the batch size traced.

    With a dynamic batch, an example of batch 1 is repeated to batch 2: torch.export
    specialises a dimension of size 1 to a constant, which would fix the file to batch 1.
    """
    batched = [x for x in inputs if x.dim()]
    sizes = {x.shape[0] for x in batched}
    example_batch = batched[0].shape[0] if batched else 1
    if not dynamic_batch or not batched:
        return inputs, None, example_batch
    if len(sizes) > 1:
        raise ExportError(
            f"dynamic_batch needs every input to share its first dimension, but the examples "
            f"have {sorted(sizes)}; pass dynamic_shapes=... or dynamic_batch=False"
        )
    if example_batch == 1:
        inputs = tuple(x.expand(2, *x.shape[1:]).clone() if x.dim() else x for x in inputs)
        example_batch = 2
    batch = torch.export.Dim("batch")
    return inputs, tuple({0: batch} if x.dim() else None for x in inputs), example_batch


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's log lines and deprecation chatter; errors still propagate."""
    logger = logging.getLogger("torch")  # torch's loggers inherit its level
    level = logger.level
    logger.setLevel(logging.ERROR)
    # onnxscript logs a traceback when its opset converter fails; the export's opset is
    # checked afterwards and a mismatch is an ExportError (see export_onnx)
    converter = logging.getLogger("onnxscript")
    converter_level = converter.level
    converter.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # inputs sharing the one batch dimension make the exporter say so once per input
            warnings.filterwarnings("ignore", message=r"\W*The axis name: .* will not be used")
            yield
    finally:
        logger.setLevel(level)
        converter.setLevel(converter_level)


def _export_dynamo(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_shapes: Any, **options: Any
) -> onnx.ModelProto:
    # torch.export prints the partial graph of a failed trace to stderr; the ExportError says
    # what matters, so that print is kept only when the export succeeds.
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        program = torch.onnx.export(
            model, inputs, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False, **options
        )
    sys.stderr.write(printed.getvalue())
    assert program is not None  # dynamo=True without a path always returns the program
    proto: onnx.ModelProto = program.model_proto
    return proto


def _torchscript_available() -> bool:
    return importlib.util.find_spec("torch.onnx.utils") is not None


def _export_torchscript(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    scratch: Path,
    *,
    dynamic_batch: bool,
    input_names: list[str],
    output_names: list[str],
    opset_version: int | None,
) -> onnx.ModelProto:
    """The legacy tracing exporter; a trace that would bake in one branch is an error."""
    import onnx

    axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        torch.onnx.export(
            model,
            inputs,
            str(scratch),
            dynamo=False,
            verbose=False,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset_version,
            dynamic_axes=axes,
        )
    proto: onnx.ModelProto = onnx.load(str(scratch))
    return proto


def _export(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    scratch: Path,
    *,
    dynamic_shapes: Any,
    user_shapes: bool,
    options: dict[str, Any],
) -> tuple[onnx.ModelProto, str | None]:
    """Export with dynamo; on failure fall back to TorchScript where that is safe and exists.

    Returns the model and, after a fallback, why the dynamo path failed.
    """
    name = type(model).__name__
    try:
        if not onnx_dynamo_export_available():
            raise ExportError(
                f"torch {torch.__version__} has no dynamo ONNX exporter (torch 2.5 and newer)"
            )
        return _export_dynamo(model, inputs, dynamic_shapes, **options), None
    except Exception as exc:  # the exporter raises many unrelated types; all are explained
        dynamo_error = exc
    if user_shapes or not _torchscript_available() or is_data_dependent(dynamo_error):
        raise explain(dynamo_error, name) from dynamo_error
    try:
        proto = _export_torchscript(
            model,
            inputs,
            scratch,
            dynamic_batch=dynamic_shapes is not None,
            input_names=options["input_names"],
            output_names=options["output_names"],
            opset_version=options["opset_version"],
        )
    except Exception as fallback_exc:  # same: whatever it is, the dynamo error leads
        first = (str(fallback_exc).strip().splitlines() or [type(fallback_exc).__name__])[0]
        raise explain(dynamo_error, name, fallback=first) from dynamo_error
    return proto, str(explain(dynamo_error, name))


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported model fails onnx.checker: {exc}") from exc


def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    verify: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-5,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    custom_translation_table: Mapping[Callable[..., Any], Callable[..., Any]] | None = None,
) -> OnnxReport:
    """Export ``model`` to ONNX, check it, verify it in onnxruntime, and only then write it.

    The model is exported with ``torch.onnx.export(..., dynamo=True)`` in eval mode (each
    submodule's mode is restored afterwards). The file is checked with ``onnx.checker``
    (``full_check=True``) and, with ``verify``, run in onnxruntime at batch sizes 1, the
    example's and a larger odd one on fresh random inputs; every output is compared with eager
    PyTorch. The report is stored in the file's ``metadata_props``. Nothing is written to
    ``path`` unless all of that passes.

    Args:
        model: the module to export.
        example_inputs: a tensor or a tuple of tensors, the positional arguments of ``forward``.
        path: the ``.onnx`` file to write (atomically; external data goes next to it).
        dynamic_batch: make the first dimension of every input dynamic. An example of batch 1
            is exported at batch 2 so the dimension does not become the constant 1.
        dynamic_shapes: ``torch.export`` dynamic shapes, used verbatim instead of
            ``dynamic_batch``.
        opset: the ONNX opset (default: the exporter's).
        input_names: graph input names (default ``input`` or ``input_0``, ``input_1``, ...).
        output_names: graph output names (default ``output`` or ``output_0``, ...).
        verify: run the file in onnxruntime and compare its outputs with PyTorch's.
        rtol: relative tolerance of the comparison.
        atol: absolute tolerance of the comparison.
        external_data_threshold: initializer bytes above which the weights are saved to an
            external data file ``<name>.<16 hex digits of its hash>.data`` next to ``path``
            (protobuf stops at 2 GiB); an overwrite deletes the previous export's data file
            only once the new ``.onnx`` is in place.
        custom_translation_table: ``{torch op: onnxscript function}`` for ops without a
            built-in ONNX translation (passed to ``torch.onnx.export``).

    Returns:
        An :class:`OnnxReport`: exporter used, opset, names, batch sizes verified, differences.

    Raises:
        MissingDependencyError: onnx, onnxscript or onnxruntime is not installed.
        ExportError: the model cannot be exported (the message names the op or line and the fix).
        ExportVerificationError: the exported model's outputs differ beyond tolerance.

    Example:
        >>> report = tk.export_onnx(Net(), torch.randn(1, 3, 32, 32), "net.onnx")
        >>> report.batch_sizes, report.max_diffs()
        ((1, 2, 7), {'output': {'max_abs_diff': 4.4e-08, 'max_rel_diff': 3.1e-06}})
    """
    require(*EXPORT_PACKAGES, feature="ONNX export")
    final = Path(path)
    write_target(final)  # the folder exists and the name can exist, before any export work
    inputs = _as_inputs(example_inputs)
    if dynamic_shapes is None:
        traced, shapes, export_batch = _batch_plan(inputs, dynamic_batch)
    else:
        traced, shapes, export_batch = inputs, dynamic_shapes, _batch_plan(inputs, False)[2]
    with eval_mode(model):
        outputs = _reference_outputs(model, inputs)
        report = OnnxReport(
            path=final,
            exporter="dynamo",
            opset=0,
            inputs=_names(input_names, len(inputs), "input"),
            outputs=_names(output_names, len(outputs), "output"),
            dynamic_batch=False,
            export_batch_size=export_batch,
            rtol=rtol,
            atol=atol,
        )
        options = {
            "input_names": report.inputs,
            "output_names": report.outputs,
            "opset_version": opset,
            "custom_translation_table": custom_translation_table,
        }
        with staging_folder(final) as stage:
            started = time.perf_counter()
            with _quiet_exporter():
                proto, report.fallback_reason = _export(
                    model,
                    traced,
                    stage / "torchscript.onnx",
                    dynamic_shapes=shapes,
                    user_shapes=dynamic_shapes is not None,
                    options=options,
                )
            staged = stage / final.name
            external = sum(t.ByteSize() for t in proto.graph.initializer) > external_data_threshold
            save_staged(proto, staged, external_data=external)
            report.exporter = "torchscript" if report.fallback_reason else "dynamo"
            report.opset = default_opset(proto)
            if opset is not None and report.opset != opset:
                raise ExportError(
                    f"torch's ONNX exporter could not produce opset {opset} for "
                    f"{type(model).__name__} (it gave opset {report.opset}); nothing was "
                    f"written to {final}. Ask for an opset it supports, or leave the default"
                )
            report.dynamic_batch = has_dynamic_batch(proto)
            report.export_seconds = time.perf_counter() - started
            started = time.perf_counter()
            _check(staged)
            if verify:
                _verify(staged, model, inputs, report)
            report.verify_seconds = time.perf_counter() - started
            report.external_data = commit(staged, final, report.metadata())
    files = [final, *(final.parent / name for name in report.external_data)]
    report.size = sum(p.stat().st_size for p in files)
    return report


def _verify(
    staged: Path, model: nn.Module, inputs: tuple[torch.Tensor, ...], report: OnnxReport
) -> None:
    """Fill in the report's verification; raise when an output is beyond tolerance."""
    batch = report.export_batch_size
    report.batch_sizes = verification_batch_sizes(batch) if report.dynamic_batch else (batch,)
    report.diffs = verify_file(
        staged,
        model,
        inputs,
        input_names=report.inputs,
        output_names=report.outputs,
        batch_sizes=report.batch_sizes,
        rtol=report.rtol,
        atol=report.atol,
    )
    if not report.ok:
        raise ExportVerificationError(
            f"the ONNX export of {type(model).__name__} gives outputs that differ from eager "
            f"PyTorch beyond rtol={report.rtol:g} atol={report.atol:g}; nothing was written "
            f"to {report.path}.\n{format_table(report.diffs)}"
        )
