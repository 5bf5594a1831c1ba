"""Check a verified step against the live objects before a restore changes any of them.

``restore`` must not leave a model half-loaded: torch's own ``load_state_dict`` copies matching
tensors one by one and raises at the first one that does not fit. Everything that decides
whether a load can succeed is therefore checked here first, against the objects as they are:

- a module: keys (missing/unexpected), shapes, dtypes;
- an optimizer: the number of parameter groups, the parameters per group, the hyperparameter
  names (another optimizer type), the per-parameter state (ids, tensor shapes and dtypes);
- an LR scheduler or a gradient scaler: the public state keys (another scheduler type) and
  the per-group list lengths;

The random generator entry is checked when the step is read (``rng.check``): a malformed one
makes the whole step unusable, like any other damage.

Objects of other types (a user's sampler) cannot be checked beyond having an entry; the
manager loads them first, so that if one of them refuses its state, the model, optimizer,
scheduler and generators are still untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidDocumentError, StateDictMismatchError

# Optimizers of torch whose every per-parameter state tensor (other than 0-d counters) has
# the shape of its parameter.
_PARAM_SHAPED_OPTIMIZERS = tuple(
    getattr(torch.optim, name)
    for name in (
        "SGD",
        "Adam",
        "AdamW",
        "Adamax",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Rprop",
        "Adagrad",
        "Adadelta",
        "ASGD",
        "SparseAdam",
    )
    if hasattr(torch.optim, name)
)
_SHOWN = 8
_LRScheduler: type = getattr(torch.optim.lr_scheduler, "LRScheduler", type(None))
_GradScaler: type = getattr(getattr(torch, "amp", None), "GradScaler", type(None))


def checkable(obj: object) -> bool:
    """True for the objects whose state :func:`check_target` checks in full."""
    return isinstance(obj, (nn.Module, torch.optim.Optimizer, _LRScheduler, _GradScaler))


def _fail(name: str, path: Path, problems: Sequence[str], fix: str) -> StateDictMismatchError:
    lines = list(problems[:_SHOWN])
    if len(problems) > _SHOWN:
        lines.append(f"... {len(problems) - _SHOWN} more")
    return StateDictMismatchError(
        f"cannot restore entry {name!r} of {path}: nothing was changed\n  "
        + "\n  ".join(lines)
        + f"\nTo fix: {fix}"
    )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def check_target(name: str, path: Path, stored: Any, obj: Any, *, strict: bool) -> None:
    """Raise :class:`StateDictMismatchError` if ``stored`` cannot be loaded into ``obj`` whole.

    Args:
        name: the entry (``"model"``), for the message.
        path: the step directory, for the message.
        stored: the entry's saved state (tensors may be views of the verified files).
        obj: the live object it would be loaded into.
        strict: for modules, require the same keys and dtypes (``strict=False`` allows missing
            and unexpected keys and converts dtypes, as ``load_state_dict(strict=False)``).
    """
    if isinstance(obj, torch.optim.Optimizer):
        _check_optimizer(name, path, stored, obj)
    elif isinstance(obj, nn.Module):
        _check_module(name, path, stored, obj, strict=strict)
    elif isinstance(obj, (_LRScheduler, _GradScaler)):
        _check_keys(name, path, stored, obj)


def _check_module(name: str, path: Path, stored: Any, module: nn.Module, *, strict: bool) -> None:
    leave_out = f"leave it out ({name}=None)"
    if not isinstance(stored, Mapping):
        raise _fail(name, path, [f"the saved state is a {type(stored).__name__}"], leave_out)
    live = module.state_dict()
    problems, fixes = [], []
    missing = [key for key in live if key not in stored]
    unexpected = [key for key in stored if key not in live]
    if strict and (missing or unexpected):
        if missing:
            problems.append(f"missing in the step ({len(missing)}): {_listing(missing)}")
        if unexpected:
            problems.append(f"not in the object ({len(unexpected)}): {_listing(unexpected)}")
        fixes.append("pass strict=False to restore the keys both have")
    shapes = dtypes = False
    for key in live:
        if key not in stored:
            continue
        saved, current = stored[key], live[key]
        if isinstance(saved, torch.Tensor) != isinstance(current, torch.Tensor):
            problems.append(f"{key}: saved {_describe(saved)}, object {_describe(current)}")
        elif isinstance(saved, torch.Tensor) and saved.shape != current.shape:
            problems.append(f"{key}: saved shape {list(saved.shape)}, object {list(current.shape)}")
            shapes = True
        elif isinstance(saved, torch.Tensor) and strict and saved.dtype != current.dtype:
            problems.append(f"{key}: saved dtype {saved.dtype}, object {current.dtype}")
            dtypes = True
    if dtypes:
        fixes.insert(0, "convert the object to the saved dtype first (or strict=False converts)")
    if shapes:
        fixes.insert(0, "build the object with the sizes it was saved with")
    if problems:
        raise _fail(name, path, problems, "; or ".join([*fixes, leave_out]))


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _groups(state: object) -> list[Mapping[str, Any]] | None:
    """The param groups of an optimizer state dict, or None when malformed."""
    if not isinstance(state, Mapping) or not isinstance(state.get("state"), Mapping):
        return None
    groups = state.get("param_groups")
    if not isinstance(groups, (list, tuple)):
        return None
    for group in groups:
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), (list, tuple)):
            return None
    return list(groups)


def _check_optimizer(name: str, path: Path, stored: Any, opt: torch.optim.Optimizer) -> None:
    fix = (
        f"build the optimizer over the same parameter groups it was saved with; or leave it out "
        f"({name}=None) to keep its current state"
    )
    groups = _groups(stored)
    if groups is None:
        raise _fail(name, path, ["the saved state is not an optimizer state dict"], fix)
    _check_param_ids(name, path, stored["state"], groups)
    live = opt.state_dict()
    live_groups = live["param_groups"]
    if len(groups) != len(live_groups):
        raise _fail(
            name,
            path,
            [f"the step has {len(groups)} parameter groups, the optimizer {len(live_groups)}"],
            fix,
        )
    problems: list[str] = []
    for index, (saved, current) in enumerate(zip(groups, live_groups, strict=True)):
        if len(saved["params"]) != len(current["params"]):
            problems.append(
                f"parameter group {index}: the step has {len(saved['params'])} parameters, the "
                f"optimizer {len(current['params'])}"
            )
        extra = sorted(set(saved) - set(current))
        lacking = sorted(set(current) - set(saved))
        if extra and lacking:  # one-sided differences are new options of another torch version
            problems.append(
                f"parameter group {index}: hyperparameters {extra} were saved, {lacking} are "
                f"expected (saved from another optimizer type than {type(opt).__name__}?)"
            )
    if problems:
        raise _fail(name, path, problems, fix)
    params: dict[Any, torch.Tensor] = {}
    live_state: dict[Any, Mapping[str, Any]] = {}
    for saved, group in zip(groups, opt.param_groups, strict=True):
        for saved_id, param in zip(saved["params"], group["params"], strict=True):
            params[saved_id] = param
            live_state[saved_id] = opt.state.get(param, {})
    problems = list(_state_problems(stored["state"], params, live_state, opt))
    if problems:
        raise _fail(name, path, problems, fix)


def _check_param_ids(
    name: str, path: Path, state: Mapping[Any, Any], groups: Sequence[Mapping[str, Any]]
) -> None:
    """Optimizer state dicts number their parameters (or name them). Any other id (a list, a
    mapping, a tuple in a crafted document) is damage, refused before it is used as a key.

    Raises:
        InvalidDocumentError: naming the entry and the id's type.
    """
    ids = [*state, *(param_id for group in groups for param_id in group["params"])]
    odd = next((i for i in ids if not isinstance(i, (int, str)) or isinstance(i, bool)), ids)
    if odd is not ids:
        raise InvalidDocumentError(
            f"{path}: entry {name!r} numbers a parameter with a {type(odd).__name__}, not an "
            "integer or a name; the step is damaged, restore another step"
        )


def _state_problems(
    state: Mapping[Any, Any],
    params: Mapping[Any, torch.Tensor],
    live_state: Mapping[Any, Mapping[str, Any]],
    opt: torch.optim.Optimizer,
) -> Iterator[str]:
    """Per-parameter state that would not fit its parameter."""
    param_shaped = isinstance(opt, _PARAM_SHAPED_OPTIMIZERS)
    kind = type(opt).__name__
    for param_id, values in state.items():
        if param_id not in params:
            yield f"state of parameter {param_id!r}, which no parameter group lists"
            continue
        if not isinstance(values, Mapping):
            yield f"state of parameter {param_id}: a {type(values).__name__}, not a mapping"
            continue
        param = params[param_id]
        for key, saved in values.items():
            if not isinstance(saved, torch.Tensor) or saved.dim() == 0:
                continue
            current = live_state[param_id].get(key)
            if isinstance(current, torch.Tensor):
                if saved.shape != current.shape or saved.dtype != current.dtype:
                    yield (
                        f"state {key!r} of parameter {param_id}: saved {_describe(saved)}, the "
                        f"optimizer has {_describe(current)}"
                    )
            elif param_shaped and saved.shape != param.shape:
                yield (
                    f"state {key!r} of parameter {param_id}: saved shape {list(saved.shape)}, "
                    f"the parameter is {list(param.shape)} ({kind} keeps it parameter-shaped)"
                )


def _public(keys: object) -> set[str]:
    return {key for key in keys if isinstance(key, str) and not key.startswith("_")} - {"verbose"}  # type: ignore[attr-defined]


def _check_keys(name: str, path: Path, stored: Any, obj: Any) -> None:
    """Schedulers and scalers: the same public keys and per-group list lengths."""
    live = obj.state_dict()
    fix = f"pass a {type(obj).__name__} configured as at the save; or leave it out ({name}=None)"
    if not isinstance(stored, Mapping):
        raise _fail(name, path, [f"the saved state is a {type(stored).__name__}"], fix)
    if live and not stored:
        raise _fail(name, path, ["the step holds an empty state (saved while disabled)"], fix)
    if not live:  # a disabled GradScaler ignores whatever it is given
        return
    problems = []
    extra, lacking = (
        sorted(_public(stored) - _public(live)),
        sorted(_public(live) - _public(stored)),
    )
    if extra or lacking:
        problems.append(
            f"saved keys {extra} are unknown to this {type(obj).__name__}, which expects "
            f"{lacking} (saved from another type?)"
        )
    for key, current in live.items():
        saved = stored.get(key)
        if isinstance(current, list) and isinstance(saved, list) and len(current) != len(saved):
            problems.append(f"{key}: {len(saved)} values saved, {len(current)} expected")
    if problems:
        raise _fail(name, path, problems, fix)
