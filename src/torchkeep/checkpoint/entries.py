"""What one ``save`` holds: named entries, each a JSON skeleton plus its own tensor file.

``model=``, ``optimizer=``, ... and every keyword given to ``save`` become one entry. Objects
with ``state_dict()`` are stored by their state (kind ``stateful``, loaded back into the object
passed to ``restore``); everything else is stored as a value (kind ``value``, returned in
``Restored.extra``). Tensors tied to one storage are written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import tree
from ..formats import safetensors as st
from ..weights import Stateful

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


def prepare(name: str, value: Any, *, state_slot: bool = False) -> Entry:
    """Turn one ``save`` keyword into an :class:`Entry`, validating every value and tensor.

    Args:
        name: the keyword (``"optimizer"``, ``"epoch"``).
        value: a :class:`~torchkeep.Stateful` object or a plain value.
        state_slot: ``name`` is one of ``model``/``optimizer``/``scheduler``/``scaler``, where a
            mapping is taken to be a state dict (restored into an object, not returned).

    Returns:
        The entry; its tensors are detached references, not copies.

    Example:
        >>> prepare("optimizer", opt).kind
        'stateful'
    """
    stateful = isinstance(value, Stateful) or (state_slot and isinstance(value, Mapping))
    state = value.state_dict() if isinstance(value, Stateful) else value
    flat = tree.flatten(state, root=name)
    unique, aliases = st.dedupe_tied(flat.tensors)
    try:
        st.validate_for_save(unique)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"cannot save {name!r}: {exc}") from None
    return Entry(name, "stateful" if stateful else "value", flat.skeleton, unique, aliases)
