"""Turn the exporter's long tracebacks into one :class:`ExportError` that says what to change."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import ExportError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MISSING_OP = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'")
_TORCHSCRIPT_OP = re.compile(r"operator\b[^\n]*?\b(\w+::\w+)")
_UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.]+)'> in output, which is not a known type")
_BROKEN_VIEW = re.compile(r"Cannot view a tensor with shape")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s+(\S[^\n]*)')
_TORCH_DIR = str(Path(torch.__file__).parent)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _text(exc: BaseException) -> str:
    return _ANSI.sub("", "\n".join(str(e) for e in _chain(exc)))


def _user_line(text: str) -> str | None:
    """``file:line in function: code`` of the last frame outside torch that the error names."""
    frames = [m for m in _FRAME.finditer(text) if not m.group(1).startswith(_TORCH_DIR)]
    if not frames:
        return None
    file, line, function, code = frames[-1].groups()
    return f"{file}:{line} in {function}: `{code.strip()}`"


def _missing_op(text: str) -> str | None:
    match = _MISSING_OP.search(text)
    if match:
        namespace, _, name = match.group(1).partition(".")
        return f"{namespace}::{name}"
    match = _TORCHSCRIPT_OP.search(text)
    return match.group(1) if match else None


def _summary(exc: BaseException) -> str:
    innermost = _chain(exc)[-1]
    first = _ANSI.sub("", str(innermost)).strip().splitlines() or [type(innermost).__name__]
    return f"{type(innermost).__name__}: {first[0]}"


def is_data_dependent(exc: BaseException) -> bool:
    """True when export failed because Python control flow depends on a tensor's value."""
    return any(type(e).__name__ == "GuardOnDataDependentSymNode" for e in _chain(exc)) or (
        "data-dependent" in _text(exc)
    )


def explain(exc: BaseException, model_name: str, *, fallback: str | None = None) -> ExportError:
    """Build the :class:`ExportError` for a failed export (raise it ``from exc``).

    Args:
        exc: what the dynamo exporter raised.
        model_name: the model's class name, for the message.
        fallback: why the TorchScript fallback failed too, when it was tried.

    Returns:
        An error naming the op or source line and the fix.

    Example:
        >>> raise explain(exc, "Net") from exc
    """
    text = _text(exc)
    where = _user_line(text)
    at = f" at {where}" if where else ""
    op = _missing_op(text)
    head = f"cannot export {model_name} to ONNX"
    unknown_output = _UNKNOWN_OUTPUT.search(text)
    if unknown_output:
        kind = unknown_output.group(1)
        message = (
            f"{head}: forward returns a {kind}, which is no tensor, tuple, list or dict and no "
            "registered pytree type, so an exported graph cannot return it. A key-value cache "
            "is the usual case: turn it off (model.config.use_cache = False, or use_cache=False "
            "in forward), return only tensors from forward, or register the type with "
            "torch.utils._pytree.register_pytree_node"
        )
    elif _BROKEN_VIEW.search(text) and "decompose" in text:
        message = (
            f"{head}: the exporter's decomposition turned a reshape into a view of a tensor "
            f"whose strides no longer allow it{at}. torch 2.13 does this after "
            "scaled_dot_product_attention: for a transformers model, use its eager attention "
            '(config attn_implementation="eager", model.set_attn_implementation("eager"), or '
            'from_pretrained(..., attn_implementation="eager")); in your own code, call '
            ".contiguous() before the reshape"
        )
    elif is_data_dependent(exc):
        message = (
            f"{head}: forward branches on the value of a tensor (data-dependent control flow)"
            f"{at}. An exported graph cannot follow a Python `if` on tensor values: rewrite the "
            "branch with torch.cond(pred, true_fn, false_fn, (x,)) so both branches are "
            "exported, or compute both and select with torch.where"
        )
    elif op:
        target = "torch.ops." + op.replace("::", ".") + ".default"
        message = (
            f"{head}: the op {op} has no ONNX translation{at}. Pass "
            f"custom_translation_table={{{target}: fn}} with an onnxscript function that builds "
            "it from ONNX ops, or replace it in the model with ops that have one"
        )
    elif "Constraints violated" in text or "specialized" in text:
        message = (
            f"{head}: the batch dimension cannot be dynamic{at} (the code fixes it to one "
            "value). Remove the hard-coded batch size, or export with dynamic_batch=False"
        )
    else:
        message = f"{head}: {_summary(exc)}{at}"
    if fallback:
        message += f". The TorchScript exporter failed too: {fallback}"
    return ExportError(message + " (the exporter's own error is chained as __cause__)")
