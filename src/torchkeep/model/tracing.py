"""The example call of ``forward`` that exports trace: positional or keyword inputs, ``None`` for
an absent one, matched to ``forward``'s signature (``*args`` and ``**kwargs`` included).

Both exports (``torch.export`` programs and ONNX files) go through :func:`example_call`, so a
Hugging Face model is exported with ``{"input_ids": ids, "attention_mask": mask}`` the way it is
called, and :func:`signature_shapes` gives ``dynamic_shapes`` in the form ``torch.export`` wants
for that call. :func:`without_kv_cache` turns a transformers model's key-value cache off while it
is exported: a cache object is not a tensor output an exported graph can return.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ExportError

ExampleInputs = torch.Tensor | Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor | None]
"""A tensor, a sequence of positional arguments, or a mapping of keyword arguments of forward."""


@dataclass(frozen=True)
class ExampleCall:
    """``forward(*args, **kwargs)`` with example tensors; ``None`` marks an absent argument.

    Attributes:
        args: positional arguments, each a tensor or ``None``.
        kwargs: keyword tensors, in the order of ``forward``'s parameters (absent ones dropped).
    """

    args: tuple[torch.Tensor | None, ...]
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors in the order an exported graph takes them: positional, then keyword."""
        return [x for x in self.args if x is not None] + list(self.kwargs.values())

    def keys(self) -> list[int | str]:
        """Each tensor's place in the call, its position or keyword (:meth:`tensors` order)."""
        positions: list[int | str] = [i for i, x in enumerate(self.args) if x is not None]
        return positions + list(self.kwargs)

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> ExampleCall:
        """The same call with its tensors replaced, in the order of :meth:`tensors`."""
        remaining = iter(tensors)
        args = tuple(None if x is None else next(remaining) for x in self.args)
        return ExampleCall(args, {name: next(remaining) for name in self.kwargs})

    def run(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)


def _parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature (a builtin, a C extension)
        return []


def example_call(model: nn.Module, example_inputs: ExampleInputs) -> ExampleCall:
    """Normalise ``example_inputs`` to an :class:`ExampleCall` of ``model.forward``.

    Args:
        model: the model whose ``forward`` is called.
        example_inputs: a tensor; a tuple or list of positional arguments (tensors or ``None``);
            or a mapping of keyword arguments (a ``None`` value leaves the argument out).

    Returns:
        The call, with tensors detached and on the CPU.

    Raises:
        ExportError: a value is neither a tensor nor ``None``, or a keyword names no parameter
            of ``forward``.

    Example:
        >>> example_call(gpt2, {"input_ids": ids, "attention_mask": None}).kwargs.keys()
        dict_keys(['input_ids'])
    """
    name = type(model).__name__
    if isinstance(example_inputs, torch.Tensor):
        return ExampleCall((example_inputs.detach().cpu(),))
    if isinstance(example_inputs, Mapping):
        given = {
            str(k): _tensor_or_none(v, f"example_inputs[{k!r}]") for k, v in example_inputs.items()
        }
        return ExampleCall((), _in_signature_order(model, name, given))
    if isinstance(example_inputs, (tuple, list)):
        args = tuple(
            _tensor_or_none(x, f"example_inputs[{i}]") for i, x in enumerate(example_inputs)
        )
        return ExampleCall(args)
    raise ExportError(
        f"example_inputs must be a tensor, a tuple of forward's positional arguments or a dict "
        f"of its keyword arguments, not {type(example_inputs).__name__}"
    )


def _tensor_or_none(value: object, where: str) -> torch.Tensor | None:
    if value is None or isinstance(value, torch.Tensor):
        return None if value is None else value.detach().cpu()
    raise ExportError(
        f"{where} is a {type(value).__name__}; example_inputs must be a tensor, a tuple of "
        "tensors or a dict of keyword tensors (None leaves an argument out). Fix other "
        "arguments with functools.partial or a wrapper module"
    )


def _in_signature_order(
    model: nn.Module, name: str, given: dict[str, torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """Keyword tensors in the order of ``forward``'s parameters; ``None`` ones dropped."""
    parameters = _parameters(model)
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters) or not parameters
    unknown = [key for key in given if key not in named]
    if unknown and not open_ended:
        raise ExportError(
            f"{name}.forward has no parameter named {', '.join(map(repr, unknown))}; its "
            f"parameters are {', '.join(named) or 'none'}"
        )
    order = [key for key in named if key in given] + unknown
    return {key: tensor for key in order if (tensor := given[key]) is not None}


def signature_shapes(
    model: nn.Module, call: ExampleCall, per_tensor: Sequence[Mapping[int, Any] | None]
) -> dict[str, Any] | tuple[Any, ...]:
    """``dynamic_shapes`` for ``call``, one entry per tensor in :meth:`ExampleCall.tensors` order.

    ``torch.export`` matches ``dynamic_shapes`` to ``forward``'s parameters: a ``*args``
    parameter takes a tuple of the positional tensors it collects, a ``**kwargs`` one a dict.

    Raises:
        ExportError: the call does not bind to ``forward``'s signature.
    """
    shapes = iter(per_tensor)

    def shape_of(value: object) -> Any:
        return None if value is None else next(shapes)

    parameters = _parameters(model)
    if not parameters:  # no signature to match: the positional form
        return tuple(shape_of(x) for x in (*call.args, *call.kwargs.values()))
    try:
        bound = inspect.Signature(parameters).bind(*call.args, **call.kwargs)
    except TypeError as exc:
        raise ExportError(
            f"the example inputs do not fit {type(model).__name__}.forward: {exc}"
        ) from exc
    result: dict[str, Any] = {}
    kinds = {p.name: p.kind for p in parameters}
    for name, value in bound.arguments.items():
        if kinds[name] is inspect.Parameter.VAR_POSITIONAL:
            result[name] = tuple(shape_of(x) for x in value)
        elif kinds[name] is inspect.Parameter.VAR_KEYWORD:
            result[name] = {key: shape_of(x) for key, x in value.items()}
        else:
            result[name] = shape_of(value)
    return result


@contextlib.contextmanager
def without_kv_cache(model: nn.Module) -> Iterator[bool]:
    """Turn off ``config.use_cache`` on ``model`` and its submodules while exporting.

    A transformers decoder returns its key-value cache as a ``Cache`` object by default, which
    no exported graph can return; with the cache off it returns plain tensors. Yields whether
    anything was turned off; every flag is restored afterwards.
    """
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    changed = [c for c in configs.values() if getattr(c, "use_cache", None) is True]
    for config in changed:
        config.use_cache = False
    try:
        yield bool(changed)
    finally:
        for config in changed:
            config.use_cache = True
