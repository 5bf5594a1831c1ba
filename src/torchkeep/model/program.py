"""``program.pt2``: the model as a ``torch.export`` program, runnable without its Python class.

Security: ``torch.export.load`` is not a safe loader. On torch 2.13 it unpickles parts of the
archive with ``weights_only=False`` (payloads marked ``use_pickle``, opaque constants via
``pickle.loads``, and, after a failed weights-only attempt, the sample inputs), evaluates shape
expressions with ``sympy.sympify``, loads AOTInductor shared libraries, and ``.module()`` execs
``guards_code`` and Python source that FX generates from the program's names. So a program is
loaded only with ``trust_program=True``, and only after :func:`scan` walked every member as a
pickle and proved every such field plain data (:mod:`torchkeep.security.programs`).
"""

from __future__ import annotations

import types
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..errors import (
    CorruptFileError,
    ExportError,
    ExportVerificationError,
    ModelClassNotFoundError,
    UnsafeCheckpointError,
    first_line,
)
from ..security import scan
from ..security.members import MemberReader
from ..security.policy import LIMITS
from ..security.programs import is_program_member, pytree_types
from .tracing import ExampleCall, ExampleInputs, example_call, signature_shapes, without_kv_cache

# An example with batch 1 makes torch.export specialise the batch to the constant 1
# ("Constraints violated (batch)"), so a batch of at least this size is exported.
_EXPORT_BATCH = 2


def _batched(model: nn.Module, call: ExampleCall) -> tuple[ExampleCall, Any]:
    """The call with a batch of at least 2 and the matching ``dynamic_shapes`` (dim 0 dynamic)."""
    tensors = call.tensors()
    batched = [x for x in tensors if x.dim() > 0]
    if not batched:
        raise ExportError(
            "example_inputs hold no tensor with a batch dimension; pass at least one tensor "
            "shaped (batch, ...)"
        )
    batch = batched[0].shape[0]
    if batch == 0:
        raise ExportError("example_inputs have an empty batch (size 0); use at least one sample")
    dim = torch.export.Dim("batch", min=1)
    grown = []
    shapes: list[dict[int, Any] | None] = []
    for x in tensors:
        if x.dim() > 0 and x.shape[0] == batch:
            repeats = -(-_EXPORT_BATCH // batch)
            grown.append(x.repeat(repeats, *([1] * (x.dim() - 1))) if repeats > 1 else x)
            shapes.append({0: dim})
        else:
            grown.append(x)
            shapes.append(None)
    traced = call.with_tensors(grown)
    return traced, signature_shapes(model, traced, shapes)


def _check_same(expected: Any, actual: Any, what: str) -> None:
    flat_expected = torch.utils._pytree.tree_leaves(expected)
    flat_actual = torch.utils._pytree.tree_leaves(actual)
    if len(flat_expected) != len(flat_actual):
        raise ExportVerificationError(f"the exported program returns a different structure {what}")
    for a, b in zip(flat_expected, flat_actual, strict=True):
        if isinstance(a, torch.Tensor) and not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            diff = (a.float() - b.float()).abs().max().item()
            raise ExportVerificationError(
                f"the exported program differs from the model {what} (max abs diff {diff:.3g}); "
                "the model may branch on values or sizes torch.export cannot capture"
            )


def export_program(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
) -> Any:
    """Export ``model`` (in eval mode) and check the program against eager outputs.

    Args:
        model: the model.
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword ones
            (``None`` leaves one out).
        dynamic_shapes: ``torch.export`` dynamic shapes, passed through (e.g. a dynamic
            sequence length); by default the batch dimension is dynamic and the example is
            grown to batch 2 if needed.

    Returns:
        The ``torch.export.ExportedProgram``.

    Raises:
        ExportError: ``torch.export`` cannot export the model with these shapes.
        ExportVerificationError: the program's outputs differ from the model's.
    """
    call = example_call(model, example_inputs)
    if dynamic_shapes is None:
        traced, shapes = _batched(model, call)
        what = "with a dynamic batch"
    else:
        traced, shapes, what = call, dynamic_shapes, "with the given dynamic_shapes"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), without_kv_cache(model):
            try:
                program = torch.export.export(
                    model, traced.args, traced.kwargs, dynamic_shapes=shapes
                )
            except Exception as exc:
                raise ExportError(
                    f"torch.export could not export {type(model).__qualname__} {what} "
                    f"({type(exc).__name__}: {first_line(exc)}). Save without example_inputs "
                    "to skip the program, or make forward() free of data-dependent Python "
                    "control flow"
                ) from exc
            module = program.module()
            for sample, label in ((call, "on the example"), (traced, "on a batch")):
                _check_same(sample.run(model), sample.run(module), label)
    finally:
        model.train(was_training)
    return program


def _eval_only(module: nn.Module, mode: bool = True) -> nn.Module:
    """``train``/``eval`` of a loaded program: it was exported in eval mode and stays there."""
    if mode:
        raise ExportError(
            "a torch.export program is fixed in eval mode (dropout off, batch-norm statistics "
            "frozen) and cannot train: .eval() and .train(False) are accepted as no-ops. To "
            "train, load the bundle with its model class installed (tk.load_model(path))"
        )
    return module


def _eval(module: nn.Module) -> nn.Module:
    """``eval`` of a loaded program: a no-op (torch's own raises NotImplementedError)."""
    return module


def _unregistered_types(path: Path) -> list[str]:
    """Pytree types the program's specs name that this process has not registered."""
    reader = MemberReader(path)
    names: set[str] = set()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if is_program_member(info.filename):
                name = f"{path}:{info.filename}"
                with reader.open(archive, info, name, LIMITS.max_document) as stream:
                    names |= pytree_types(stream.read(LIMITS.max_document + 1))
    return sorted(n for n in names if n not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)


def load_program(path: Path, *, map_location: torch.device | str = "cpu") -> nn.Module:
    """Load ``program.pt2`` as a callable module after a scan approves it (see module doc)."""
    report = scan(path)
    offending = [f for f in report.findings if f.severity.value != "safe"]
    if offending:
        listed = ", ".join(f"{f.name} ({f.reason})" for f in offending[:10])
        raise UnsafeCheckpointError(
            f"{path} was refused even with trust_program=True: loading it would import or run "
            f"{listed}. Run `torchkeep scan {path}` for details; do not load it"
        )
    missing = _unregistered_types(path)
    if missing:
        modules = ", ".join(sorted({f"import {n.rpartition('.')[0]}" for n in missing}))
        raise ModelClassNotFoundError(
            f"{path} takes or returns {', '.join(missing)}, a pytree type not registered in this "
            "process; torch.export.load only looks such types up, and torchkeep never imports a "
            f"module a program names. Import the installed library that registers it first "
            f"({modules}), then load again"
        )
    try:
        module: nn.Module = torch.export.load(str(path)).module()
    except Exception as exc:  # torch raises anything from KeyError to SerializeError
        raise CorruptFileError(
            f"{path} passed the scan but torch.export.load could not load it "
            f"({type(exc).__name__}: {first_line(exc)}); re-export the model with "
            "torch.export.save, or load the bundle with its class installed"
        ) from exc
    module = module.to(map_location)
    # torch's program module raises on .eval()/.train(); it was exported in eval mode
    module.train = types.MethodType(_eval_only, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(_eval, module)  # type: ignore[method-assign]
    return module
