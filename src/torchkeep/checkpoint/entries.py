"""What one ``save`` holds: named entries, each a JSON skeleton plus its own tensor file.

``model=``, ``optimizer=``, ... and every keyword given to ``save`` become one entry. Objects
with ``state_dict()`` and ``torch.Generator`` objects are stored by their state (kind
``stateful``, loaded back into the object passed to ``restore``); everything else is stored
as a value (kind ``value``, returned in ``Restored.extra``). Tensors tied to one storage are
written once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import tree
from ..errors import UnsupportedValueError
from ..formats import safetensors as st
from ..unwrap import unwrap
from ..weights import Stateful
from .layout import ENTRY_NAME_PATTERN, RESERVED_PREFIX, STATE_LIMITS

# Leaves room in state.json, whose reader refuses documents over STATE_LIMITS.max_bytes, for
# the other entries of the step.
_MAX_SKELETON_BYTES = STATE_LIMITS.max_bytes // 4
# The longest entry name, in UTF-8 bytes, whose file ``<name>.safetensors`` fits in the 255
# bytes of a file name.
MAX_NAME_BYTES = 255 - len(".safetensors")

Kind = Literal["stateful", "value"]


@dataclass
class Entry:
    """One named part of a checkpoint step, validated and ready to be written."""

    name: str
    kind: Kind
    skeleton: tree.Json
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def file_name(self) -> str | None:
        """The tensor file of this entry, or None when it holds no tensor."""
        return f"{self.name}.safetensors" if self.tensors else None


class GeneratorState:
    """A ``torch.Generator`` as a :class:`~torchkeep.Stateful` object: its state bytes and
    device, put back in place by ``load_state_dict`` (``set_state`` on the same generator)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        """The generator's device and a copy of its state bytes."""
        return {"device": self.generator.device, "state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        """Set the generator's state, after checking it was saved from one of the same kind."""
        current = self.generator.get_state()
        saved = state.get("state") if isinstance(state, Mapping) else None
        device = state.get("device") if isinstance(state, Mapping) else None
        if device != self.generator.device:
            raise ValueError(
                f"the saved generator was on {device}, this one is on {self.generator.device}; "
                "pass a generator of the same device"
            )
        if not (
            isinstance(saved, torch.Tensor)
            and saved.dtype == torch.uint8
            and tuple(saved.shape) == tuple(current.shape)
        ):
            shape = list(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(
                f"the saved generator state is {shape}, not {list(current.shape)} bytes like "
                "this generator's; pass a generator of the kind that was saved"
            )
        self.generator.set_state(saved.cpu())


def as_stateful(value: Any) -> Any:
    """``value``, with a ``torch.Generator`` seen through :class:`GeneratorState`."""
    return GeneratorState(value) if isinstance(value, torch.Generator) else value


def check_name(name: object, *, internal: bool = False) -> str:
    """Return ``name`` if it can name an entry, else raise :class:`UnsupportedValueError`.

    Entry names become file names (``<name>.safetensors``): a non-empty string of at most 200
    characters without path separators or NUL, not starting with a dot, valid UTF-8 (no lone
    surrogate) of at most ``MAX_NAME_BYTES`` bytes, so that the file name fits the 255 bytes
    file systems allow. Names starting with ``torchkeep.`` are torchkeep's own (the random
    generator states) unless ``internal``.
    """
    if not isinstance(name, str) or not re.fullmatch(ENTRY_NAME_PATTERN, name):
        raise UnsupportedValueError(
            f"cannot save an entry named {str(name)[:80]!r}: entry names are non-empty strings "
            "of at most 200 characters without '/', '\\' or NUL that do not start with '.'; "
            "rename it"
        )
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        size = None
    if size is None or size > MAX_NAME_BYTES:
        raise UnsupportedValueError(
            f"cannot save an entry named {name[:80]!r}: as the file name {name[:80]!r}.safetensors "
            f"it is {'not valid UTF-8 (a lone surrogate)' if size is None else f'{size} bytes'}; "
            f"names must be valid UTF-8 of at most {MAX_NAME_BYTES} bytes; rename it"
        )
    if name.startswith(RESERVED_PREFIX) and not internal:
        raise UnsupportedValueError(
            f"cannot save an entry named {name!r}: names starting with {RESERVED_PREFIX!r} are "
            "reserved for torchkeep's own entries; rename it"
        )
    return name


def prepare(name: str, value: Any, *, state_slot: bool = False, internal: bool = False) -> Entry:
    """Turn one ``save`` keyword into an :class:`Entry`, validating every value and tensor.

    Args:
        name: the keyword (``"optimizer"``, ``"epoch"``).
        value: a :class:`~torchkeep.Stateful` object or a plain value.
        state_slot: ``name`` is one of ``model``/``optimizer``/``scheduler``/``scaler``, where a
            mapping is taken to be a state dict (restored into an object, not returned).
        internal: the entry is torchkeep's own (its name may use the reserved prefix).

    Returns:
        The entry; its tensors are detached references, not copies.

    Raises:
        UnsupportedValueError: the name, a value or a tensor cannot be stored (the message
            names its path), before anything is written.

    Example:
        >>> prepare("optimizer", opt).kind
        'stateful'
    """
    check_name(name, internal=internal)
    value = as_stateful(value)
    stateful = isinstance(value, Stateful) or (state_slot and isinstance(value, Mapping))
    # A compiled or DDP-wrapped model is stored by the module inside, under its clean keys.
    state = unwrap(value).state_dict() if isinstance(value, Stateful) else value
    flat = tree.flatten(state, root=name)
    unique, aliases = st.dedupe_tied(flat.tensors)
    try:
        st.validate_for_save(unique)
    except (TypeError, ValueError) as exc:
        raise UnsupportedValueError(f"cannot save {name!r}: {exc}") from None
    size = len(json.dumps(flat.skeleton, allow_nan=False))
    if size > _MAX_SKELETON_BYTES:
        raise UnsupportedValueError(
            f"cannot save {name!r}: its values other than tensors take {size} bytes of JSON "
            f"(limit {_MAX_SKELETON_BYTES}); store large data as tensors"
        )
    return Entry(name, "stateful" if stateful else "value", flat.skeleton, unique, aliases)
