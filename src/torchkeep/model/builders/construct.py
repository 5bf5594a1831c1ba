"""Building a model without initialising its weights, and checking a rebuild against the
original: the one construction path both :func:`save_model`'s rebuild check and
:func:`load_model` use, so what the check proves is what the load does."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from ...errors import TorchkeepError

_MAX_LISTED = 5


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this block every parameter a module registers lives on the meta device.

    Buffers are left alone: a model's non-persistent buffers (rotary frequencies, attention
    masks, position indices) are computed for real, as a normal build computes them, while the
    weights (which the bundle's weights file replaces) take no memory and no initialisation
    time: initialisers run on meta tensors, which do nothing. Parameters keep their class and
    ``requires_grad``. The patch is process-wide while the block runs.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and not param.is_meta:
            kwargs = dict(param.__dict__)
            kwargs["requires_grad"] = param.requires_grad
            self._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_without_init(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with every parameter on the meta device (see :func:`parameters_on_meta`)."""
    with parameters_on_meta():
        return factory()


MAX_COMPUTED_BYTES = 1 << 26
"""Bytes a bundle's model may compute at build beyond what its weights file stores (its
non-persistent buffers: rotary frequencies, position ids, sinusoidal tables, causal masks)."""


class BuiltSize(NamedTuple):
    """Bytes of a model built on the meta device: its persistent state (what a weights file
    holds, tied tensors counted once, each in its stored dtype) and its non-persistent buffers
    (computed at build, in their own dtype)."""

    stored: int
    computed: int


def built_size(
    make: Callable[[], nn.Module], dtypes: Mapping[str, torch.dtype]
) -> BuiltSize | None:
    """The :class:`BuiltSize` of the model ``make`` builds, each persistent tensor in the dtype
    ``dtypes`` gives its name (the stored one: a model cast after it was built stores another
    dtype than a fresh build's), found by building it entirely on the meta device, where
    nothing is allocated (a factory's ``torch.empty`` included); None if it cannot be built
    there."""
    try:
        with torch.device("meta"):
            model = make()
    except TorchkeepError:
        raise
    except Exception:
        return None
    state, transient = _tensors(model)
    stored = {id(t): (n, t) for n, t in state.items()}
    computed = {id(t): t for t in transient.values() if id(t) not in stored}
    return BuiltSize(
        sum(int(t.numel()) * int(dtypes.get(n, t.dtype).itemsize) for n, t in stored.values()),
        sum(int(t.numel()) * int(t.dtype.itemsize) for t in computed.values()),
    )


def materialise(
    model: nn.Module, device: torch.device, dtypes: Mapping[str, torch.dtype] | None = None
) -> None:
    """Give every meta parameter and buffer uninitialised memory on ``device`` (in the dtype
    ``dtypes`` names for it, else its own) and move the real buffers there.

    Tensors shared between modules (tied weights) stay shared: each is replaced once.
    """
    dtypes = dtypes or {}
    done: dict[int, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                dtype = dtypes.get(dot + name, param.dtype)
                data = (
                    torch.empty_like(param, device=device, dtype=dtype)
                    if param.is_meta
                    else param.data.to(device)
                )
                done[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
            module._parameters[name] = done[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if id(buffer) not in done:
                dtype = dtypes.get(dot + name, buffer.dtype)
                done[id(buffer)] = (
                    torch.empty_like(buffer, device=device, dtype=dtype)
                    if buffer.is_meta
                    else buffer.to(device)
                )
            module._buffers[name] = done[id(buffer)]


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(persistent state by name, non-persistent buffers by name)."""
    state = model.state_dict(keep_vars=True)
    transient = {n: b for n, b in model.named_buffers(remove_duplicate=False) if n not in state}
    return state, transient


def rebuild_problems(model: nn.Module, rebuilt: nn.Module) -> list[str]:
    """How ``rebuilt`` (from the recorded recipe) differs from ``model``; empty when it loads.

    The weights file will give every persistent tensor its stored values and dtype, so those
    must match in name and shape. Non-persistent buffers are not stored: a load keeps what the
    rebuild computed, so they must match in name, shape, dtype and (where the rebuild computed
    them) value. Each problem names its key.
    """
    state, transient = _tensors(model)
    fresh_state, fresh_transient = _tensors(rebuilt)
    problems = [f"{k!r} is not rebuilt" for k in state if k not in fresh_state]
    problems += [f"{k!r} is rebuilt but not in the model" for k in fresh_state if k not in state]
    problems += [
        f"{k!r} has shape {tuple(v.shape)}, rebuilt {tuple(fresh_state[k].shape)}"
        for k, v in state.items()
        if k in fresh_state and v.shape != fresh_state[k].shape
    ]
    for name, buffer in transient.items():
        fresh = fresh_transient.get(name)
        if fresh is None:
            problems.append(f"non-persistent buffer {name!r} is not rebuilt")
        elif (fresh.shape, fresh.dtype) != (buffer.shape, buffer.dtype):
            problems.append(
                f"non-persistent buffer {name!r} is {buffer.dtype} {tuple(buffer.shape)}, "
                f"rebuilt {fresh.dtype} {tuple(fresh.shape)}"
            )
        elif not (fresh.is_meta or buffer.is_meta) and not _same_values(buffer, fresh):
            problems.append(f"non-persistent buffer {name!r} is rebuilt with other values")
    problems += [
        f"non-persistent buffer {k!r} is rebuilt but not in the model"
        for k in fresh_transient
        if k not in transient
    ]
    return problems


def buffer_cast(model: nn.Module, rebuilt: nn.Module) -> torch.dtype | None:
    """The one dtype ``model``'s floating non-persistent buffers were cast to after it was
    built (``model.to(torch.bfloat16)`` casts rotary frequencies too), or None if none was."""
    _, transient = _tensors(model)
    _, fresh = _tensors(rebuilt)
    cast = {
        buffer.dtype
        for name, buffer in transient.items()
        if name in fresh and buffer.is_floating_point() and buffer.dtype != fresh[name].dtype
    }
    return cast.pop() if len(cast) == 1 else None


def cast_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating non-persistent buffers to ``dtype``, as ``model.to(dtype)``
    did to the model that was saved (persistent ones come from the weights file)."""
    persistent = set(model.state_dict(keep_vars=True))
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_floating_point() and dot + name not in persistent:
                module._buffers[name] = buffer.to(dtype)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.detach().cpu(), b.detach().cpu()))


def summary(problems: list[str]) -> str:
    """The first few problems, and how many more there are."""
    shown = "; ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")
