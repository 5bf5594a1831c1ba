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
from ..model.tracing import (
    ExampleCall,
    ExampleInputs,
    example_call,
    signature_shapes,
    without_kv_cache,
)
from ..paths import write_target
from ..remote_files import refuse_url
from ..unwrap import unwrap
from ._deps import EXPORT_PACKAGES, require
from .failures import explain, is_data_dependent
from .files import EXTERNAL_DATA_THRESHOLD, commit, save_staged, staging_folder
from .graph import default_opset, dynamic_axes, has_dynamic_batch, name_dynamic_axes
from .ranges import InputRange, describe_inputs, integer_ranges
from .report import OnnxReport, format_table
from .verification import eval_mode, flatten_tensors, verification_batch_sizes, verify_file

if TYPE_CHECKING:
    import onnx

KV_CACHE_NOTE = (
    "config.use_cache was turned off for the export: the file returns no key-value cache"
)


def _describe(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{list(x.shape)}:{str(x.dtype).removeprefix('torch.')}" for x in tensors)


def _reference_outputs(model: nn.Module, call: ExampleCall) -> object:
    """The model's outputs on the example call; its own error (a shape its layers reject) is
    an :class:`ExportError` that names the inputs, not a raw exception from deep in torch."""
    try:
        with torch.no_grad():
            return call.run(model)
    except Exception as exc:
        raise ExportError(
            f"{type(model).__name__} raised on the example inputs ({_describe(call.tensors())}): "
            f"{type(exc).__name__}: {first_line(exc)}; pass inputs its forward accepts "
            "(--input-shape on the command line)"
        ) from exc


def default_input_names(call: ExampleCall) -> list[str]:
    """Keyword inputs keep their keyword; positional ones are ``input`` or ``input_<i>``."""
    keys = call.keys()
    positional = sum(isinstance(key, int) for key in keys)
    if positional == 1 and len(keys) == 1:
        return ["input"]
    return [key if isinstance(key, str) else f"input_{key}" for key in keys]


def _default_output_names(outputs: object) -> list[str] | None:
    """A mapping of tensors (a transformers ``ModelOutput``) names its outputs by its keys."""
    if (
        isinstance(outputs, Mapping)
        and outputs
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in outputs.items())
    ):
        return list(outputs)
    return None


def _names(
    given: Sequence[str] | None, count: int, stem: str, default: list[str] | None = None
) -> list[str]:
    names = list(given) if given is not None else default or []
    if given is None and default is None:
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


def _is_token_input(x: torch.Tensor) -> bool:
    return x.dim() >= 2 and not (x.is_floating_point() or x.is_complex())


def _sequence_axes(
    tensors: Sequence[torch.Tensor], dynamic_sequence: bool | None
) -> list[dict[int, str]]:
    """Per tensor, ``{1: name}`` for a dynamic sequence dimension, or ``{}``.

    On by default when an input holds integers shaped ``(batch, sequence, ...)`` (token ids):
    dimension 1 of every integer or bool input of two or more dimensions is then dynamic;
    inputs of equal example length share one dimension (``sequence``), other lengths get
    their own (``sequence_2``, ...).
    """
    tokens = [_is_token_input(x) for x in tensors]
    if dynamic_sequence is None:
        dynamic_sequence = any(
            t and x.dtype != torch.bool for t, x in zip(tokens, tensors, strict=True)
        )
    if not dynamic_sequence:
        return [{} for _ in tensors]
    if not any(tokens):
        raise ExportError(
            "dynamic_sequence=True needs an integer input shaped (batch, sequence, ...); pass "
            "dynamic_shapes=... for other inputs"
        )
    names: dict[int, str] = {}
    axes: list[dict[int, str]] = []
    for token, x in zip(tokens, tensors, strict=True):
        if not token:
            axes.append({})
            continue
        length = x.shape[1]
        if length < 2:
            raise ExportError(
                f"an example sequence of length {length} cannot be exported with a dynamic "
                "sequence length (torch.export fixes a dimension of size 1); give an example "
                "of at least 2 tokens, or pass dynamic_sequence=False"
            )
        name = names.setdefault(length, "sequence" if not names else f"sequence_{len(names) + 1}")
        axes.append({1: name})
    return axes


def _shapes(
    model: nn.Module,
    call: ExampleCall,
    batch_shapes: Sequence[dict[int, Any] | None] | None,
    sequence_axes: Sequence[dict[int, str]],
) -> Any:
    """``dynamic_shapes`` for the traced call: the batch plan's and the sequence dimensions."""
    dims: dict[str, Any] = {}
    per_tensor: list[dict[int, Any] | None] = []
    for i, axes in enumerate(sequence_axes):
        entry = dict((batch_shapes[i] or {}) if batch_shapes is not None else {})
        entry.update({axis: dims.setdefault(n, torch.export.Dim(n)) for axis, n in axes.items()})
        per_tensor.append(entry or None)
    if all(entry is None for entry in per_tensor):
        return None
    return signature_shapes(model, call, per_tensor)


def _plan(
    model: nn.Module,
    call: ExampleCall,
    names: Sequence[str],
    dynamic_batch: bool,
    dynamic_sequence: bool | None,
) -> tuple[ExampleCall, Any, dict[str, dict[int, str]], int]:
    """The call to trace, its ``dynamic_shapes``, the planned axis names per input and the
    batch size traced: the batch plan and the sequence plan together."""
    tensors = call.tensors()
    grown, batch_shapes, export_batch = _batch_plan(tuple(tensors), dynamic_batch)
    traced = call.with_tensors(grown)
    sequence_axes = _sequence_axes(tensors, dynamic_sequence)
    batch_axes = [{0: "batch"} if entry else {} for entry in batch_shapes or [None] * len(names)]
    axes = {
        name: {**batch, **sequence}
        for name, batch, sequence in zip(names, batch_axes, sequence_axes, strict=True)
    }
    return traced, _shapes(model, traced, batch_shapes, sequence_axes), axes, export_batch


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
            # an absent (None) input: torchkeep names the axes itself (graph.name_dynamic_axes)
            warnings.filterwarnings(
                "ignore", message=r"\W*ONNX model has different number of inputs"
            )
            yield
    finally:
        logger.setLevel(level)
        converter.setLevel(converter_level)


def _export_dynamo(
    model: nn.Module, call: ExampleCall, dynamic_shapes: Any, **options: Any
) -> onnx.ModelProto:
    # torch.export prints the partial graph of a failed trace to stderr; the ExportError says
    # what matters, so that print is kept only when the export succeeds.
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        program = torch.onnx.export(
            model,
            call.args,
            kwargs=call.kwargs,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            **options,
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
    axes: dict[str, dict[int, str]] | None,
    input_names: list[str],
    output_names: list[str],
    opset_version: int | None,
) -> onnx.ModelProto:
    """The legacy tracing exporter; a trace that would bake in one branch is an error."""
    import onnx

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
    call: ExampleCall,
    scratch: Path,
    *,
    dynamic_shapes: Any,
    axes: dict[str, dict[int, str]] | None,
    options: dict[str, Any],
) -> tuple[onnx.ModelProto, str | None]:
    """Export with dynamo; on failure fall back to TorchScript where that is safe and exists.

    The fallback is tried only for positional tensor inputs and torchkeep's own dynamic axes
    (``axes``; ``None`` when the caller gave ``dynamic_shapes``). Returns the model and, after a
    fallback, why the dynamo path failed.
    """
    name = type(model).__name__
    try:
        if not onnx_dynamo_export_available():
            raise ExportError(
                f"torch {torch.__version__} has no dynamo ONNX exporter (torch 2.5 and newer)"
            )
        return _export_dynamo(model, call, dynamic_shapes, **options), None
    except Exception as exc:  # the exporter raises many unrelated types; all are explained
        dynamo_error = exc
    positional = not call.kwargs and all(x is not None for x in call.args)
    if (
        axes is None
        or not positional
        or not _torchscript_available()
        or is_data_dependent(dynamo_error)
    ):
        raise explain(dynamo_error, name) from dynamo_error
    batched = any(0 in entry for entry in axes.values())
    outputs = {name: {0: "batch"} for name in options["output_names"]} if batched else {}
    try:
        proto = _export_torchscript(
            model,
            tuple(call.tensors()),
            scratch,
            axes={**outputs, **axes} if dynamic_shapes is not None else None,
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
    dynamic_sequence: bool | None = None,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    input_ranges: Mapping[str, tuple[int, int]] | None = None,
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
    submodule's mode is restored afterwards) and, for a transformers model, with
    ``config.use_cache`` off (its key-value cache is no tensor a graph can return; restored
    afterwards, and noted in the report). The file is checked with ``onnx.checker``
    (``full_check=True``) and, with ``verify``, run in onnxruntime at batch sizes 1, the
    example's and a larger odd one on fresh random inputs; every output is compared with eager
    PyTorch. The report is stored in the file's ``metadata_props``. Nothing is written to
    ``path`` unless all of that passes.

    Args:
        model: the module to export.
        example_inputs: a tensor, a tuple of ``forward``'s positional arguments, or a dict of
            its keyword arguments (``{"input_ids": ids, "attention_mask": mask}``); a ``None``
            is an absent argument (not a graph input).
        path: the ``.onnx`` file to write (atomically; external data goes next to it).
        dynamic_batch: make the first dimension of every input dynamic. An example of batch 1
            is exported at batch 2 so the dimension does not become the constant 1.
        dynamic_sequence: make dimension 1 of every integer or bool input of two or more
            dimensions dynamic (the sequence of token ids and masks); inputs of equal example
            length share one dimension. ``None`` (the default): on when an integer input has
            two or more dimensions. The example needs at least 2 tokens.
        dynamic_shapes: ``torch.export`` dynamic shapes, used verbatim instead of
            ``dynamic_batch`` and ``dynamic_sequence``.
        input_ranges: ``{input name: (low, high)}``, the values (``high`` excluded) an integer
            input is verified with. Default: from the model (``config.vocab_size`` for
            ``input_ids``, 0/1 for masks, the size of its only embedding), else the range of
            the example's values; an integer input with neither is an :class:`ExportError`.
        opset: the ONNX opset (default: the exporter's).
        input_names: graph input names, one per tensor (default: a keyword input's keyword,
            else ``input`` or ``input_<position>``).
        output_names: graph output names (default: the keys of a dict of tensors such as a
            transformers ``ModelOutput``, else ``output`` or ``output_0``, ...).
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
        StorageCapabilityError: ``path`` is a URL (ONNX export writes local files only).
        ExportError: the model cannot be exported (the message names the op or line and the fix).
        ExportVerificationError: the exported model's outputs differ beyond tolerance.

    Example:
        >>> report = tk.export_onnx(Net(), torch.randn(1, 3, 32, 32), "net.onnx")
        >>> report.batch_sizes, report.max_diffs()
        ((1, 2, 7), {'output': {'max_abs_diff': 4.4e-08, 'max_rel_diff': 3.1e-06}})
    """
    refuse_url(path)
    model = unwrap(model)  # a torch.compile'd or DDP-wrapped model exports the module inside
    require(*EXPORT_PACKAGES, feature="ONNX export")
    final = Path(path)
    write_target(final)  # the folder exists and the name can exist, before any export work
    call = example_call(model, example_inputs)
    tensors = call.tensors()
    if not tensors:
        raise ExportError("example_inputs hold no tensor; give at least one input")
    names = _names(input_names, len(tensors), "input", default_input_names(call))
    ranges = integer_ranges(model, names, tensors, input_ranges)
    if dynamic_shapes is None:
        traced, shapes, axes, export_batch = _plan(
            model, call, names, dynamic_batch, dynamic_sequence
        )
    else:
        traced, shapes, axes = call, dynamic_shapes, None
        export_batch = _batch_plan(tuple(tensors), False)[2]
    with eval_mode(model), without_kv_cache(model) as cache_off:
        outputs = _reference_outputs(model, call)
        flat = flatten_tensors(outputs)
        report = OnnxReport(
            path=final,
            exporter="dynamo",
            opset=0,
            inputs=names,
            outputs=_names(output_names, len(flat), "output", _default_output_names(outputs)),
            dynamic_batch=False,
            export_batch_size=export_batch,
            rtol=rtol,
            atol=atol,
            input_values=describe_inputs(names, tensors, ranges),
            notes=[KV_CACHE_NOTE] if cache_off else [],
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
                    axes=axes,
                    options=options,
                )
            if axes is not None:
                name_dynamic_axes(proto, axes)
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
            report.dynamic_axes = dynamic_axes(proto)
            report.export_seconds = time.perf_counter() - started
            started = time.perf_counter()
            _check(staged)
            if verify:
                _verify(staged, model, call, report, ranges)
            report.verify_seconds = time.perf_counter() - started
            report.external_data = commit(staged, final, report.metadata())
    files = [final, *(final.parent / name for name in report.external_data)]
    report.size = sum(p.stat().st_size for p in files)
    return report


def _other_lengths(
    tensors: Sequence[torch.Tensor], names: Sequence[str], axes: Mapping[str, Mapping[int, str]]
) -> list[dict[str, int]]:
    """One case that changes every symbolic non-batch dimension from its example size.

    The new size is about half the example's (never more, so a model with a maximum length,
    such as learned position embeddings, still accepts it), or one more when that is the same.
    """
    example: dict[str, int] = {}
    for name, tensor in zip(names, tensors, strict=True):
        for axis, dim in axes.get(name, {}).items():
            if axis and axis < tensor.dim():
                example.setdefault(dim, tensor.shape[axis])
    if not example:
        return []
    other = {
        dim: size // 2 + 1 if size // 2 + 1 != size else size + 1 for dim, size in example.items()
    }
    return [other]


def _verify(
    staged: Path,
    model: nn.Module,
    call: ExampleCall,
    report: OnnxReport,
    ranges: Mapping[str, InputRange],
) -> None:
    """Fill in the report's verification; raise when an output is beyond tolerance."""
    batch = report.export_batch_size
    report.batch_sizes = verification_batch_sizes(batch) if report.dynamic_batch else (batch,)
    report.lengths = _other_lengths(call.tensors(), report.inputs, report.dynamic_axes)
    report.diffs = verify_file(
        staged,
        model,
        call,
        input_names=report.inputs,
        output_names=report.outputs,
        batch_sizes=report.batch_sizes,
        rtol=report.rtol,
        atol=report.atol,
        lengths=report.lengths,
        ranges=ranges,
    )
    if not report.ok:
        raise ExportVerificationError(
            f"the ONNX export of {type(model).__name__} gives outputs that differ from eager "
            f"PyTorch beyond rtol={report.rtol:g} atol={report.atol:g}; nothing was written "
            f"to {report.path}.\n{format_table(report.diffs)}"
        )
