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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compat import require_examined_program_loader
from ..errors import (
    CorruptFileError,
    ExportError,
    ExportVerificationError,
    UnsafeCheckpointError,
    first_line,
)
from ..security import scan

# An example with batch 1 makes torch.export specialise the batch to the constant 1
# ("Constraints violated (batch)"), so a batch of at least this size is exported.
_EXPORT_BATCH = 2


def as_tuple(example_inputs: torch.Tensor | Sequence[Any]) -> tuple[Any, ...]:
    """Normalise ``example_inputs`` (one tensor or a sequence of arguments) to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _batched(inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Inputs with a batch of at least 2 and the matching ``dynamic_shapes`` (dim 0 dynamic)."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors:
        raise ExportError(
            "example_inputs hold no tensor with a batch dimension; pass at least one tensor "
            "shaped (batch, ...)"
        )
    batch = tensors[0].shape[0]
    if batch == 0:
        raise ExportError("example_inputs have an empty batch (size 0); use at least one sample")
    dim = torch.export.Dim("batch", min=1)
    grown = []
    shapes: list[dict[int, Any] | None] = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            repeats = -(-_EXPORT_BATCH // batch)
            grown.append(x.repeat(repeats, *([1] * (x.dim() - 1))) if repeats > 1 else x)
            shapes.append({0: dim})
        else:
            grown.append(x)
            shapes.append(None)
    return tuple(grown), tuple(shapes)


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


def export_program(model: nn.Module, example_inputs: torch.Tensor | Sequence[Any]) -> Any:
    """Export ``model`` (in eval mode) with a dynamic batch and check it against eager outputs.

    Returns:
        The ``torch.export.ExportedProgram``.
    """
    inputs = as_tuple(example_inputs)
    batched, dynamic_shapes = _batched(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                program = torch.export.export(model, batched, dynamic_shapes=dynamic_shapes)
            except Exception as exc:
                first = first_line(exc)
                raise ExportError(
                    f"torch.export could not export {type(model).__qualname__} with a dynamic "
                    f"batch ({type(exc).__name__}: {first}). Save without example_inputs to "
                    "skip the program, or make forward() free of data-dependent Python control "
                    "flow"
                ) from exc
            module = program.module()
            for sample, label in ((inputs, "on the example"), (batched, "on a batch")):
                _check_same(model(*sample), module(*sample), label)
    finally:
        model.train(was_training)
    return program


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
    require_examined_program_loader(path)
    try:
        module: nn.Module = torch.export.load(str(path)).module()
    except Exception as exc:  # torch raises anything from KeyError to SerializeError
        raise CorruptFileError(
            f"{path} passed the scan but torch.export.load could not load it "
            f"({type(exc).__name__}: {first_line(exc)}); re-export the model with "
            "torch.export.save, or load the bundle with its class installed"
        ) from exc
    return module.to(map_location)
