"""Which values each integer input of an export is verified with (token ids, masks, indices).

Verifying a text model on all-zero token ids proves little: every row looks up one embedding.
So every integer input gets a range of valid values, declared by the caller or derived from the
model, and verification draws fresh random values from it. The report says which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ExportError

# Keyword inputs whose values a transformers model documents, with the config field that bounds
# them: token ids below the vocabulary size, masks of 0 and 1, segment ids below type_vocab_size.
_VOCAB_INPUTS = frozenset({"input_ids", "decoder_input_ids"})
_MASK_INPUTS = frozenset({"attention_mask", "decoder_attention_mask"})
_SEGMENT_INPUTS = frozenset({"token_type_ids"})


@dataclass(frozen=True)
class InputRange:
    """Integers ``low <= value < high`` for one input, and where that range came from."""

    low: int
    high: int
    source: str
    padding_mask: bool = False
    """An attention mask: rows of 1 then 0 (right padding), each row at least one 1. Random 0/1
    would mask whole rows of attention, whose outputs mean nothing and differ between runtimes."""

    def describe(self) -> str:
        """``"random integers in [0, 100) (config.vocab_size)"``."""
        if self.padding_mask:
            return f"random right-padded masks of 1 then 0 ({self.source})"
        return f"random integers in [{self.low}, {self.high}) ({self.source})"


def _config_int(model: nn.Module, field: str) -> int | None:
    value = getattr(getattr(model, "config", None), field, None)
    return value if type(value) is int and value > 0 else None


def _embeddings(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]


def _derived(model: nn.Module, name: str, integer_inputs: int) -> InputRange | None:
    """The range a model's config or its only embedding gives ``name``, if any."""
    if name in _MASK_INPUTS:
        return InputRange(0, 2, f"{name} is a mask", padding_mask=True)
    if name in _VOCAB_INPUTS and (vocab := _config_int(model, "vocab_size")):
        return InputRange(0, vocab, "config.vocab_size")
    if name in _SEGMENT_INPUTS and (types := _config_int(model, "type_vocab_size")):
        return InputRange(0, types, "config.type_vocab_size")
    embeddings = _embeddings(model)
    if integer_inputs == 1 and len(embeddings) == 1:
        module_name, embedding = embeddings[0]
        return InputRange(0, embedding.num_embeddings, f"size of the embedding {module_name}")
    return None


def _declared(name: str, value: object) -> InputRange:
    low, high = value if isinstance(value, (tuple, list)) and len(value) == 2 else (None, None)
    if type(low) is not int or type(high) is not int or low >= high:
        raise ExportError(
            f"input_ranges[{name!r}] = {value!r:.60}: give (low, high) integers with low < high "
            "(high excluded), e.g. (0, vocab_size)"
        )
    return InputRange(low, high, "declared")


def integer_ranges(
    model: nn.Module,
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
    declared: Mapping[str, object] | None,
) -> dict[str, InputRange]:
    """The value range of every integer (not bool) input, by graph input name.

    In order: ``declared[name]``; for transformers-style names, the model's config
    (``input_ids`` below ``config.vocab_size``, masks 0 or 1, ``token_type_ids`` below
    ``config.type_vocab_size``); the size of the model's only ``nn.Embedding`` when there is one
    integer input; the range of the example's own values when they are not all equal.

    Raises:
        ExportError: ``declared`` names no integer input or holds a bad range, or an input's
            range cannot be told (its example holds one value and nothing bounds it).
    """
    integer = {
        n: x
        for n, x in zip(names, tensors, strict=True)
        if not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
    }
    unknown = sorted(set(declared or {}) - set(integer))
    if unknown:
        raise ExportError(
            f"input_ranges names {', '.join(map(repr, unknown))}, which is no integer input; the "
            f"integer inputs are {', '.join(map(repr, integer)) or 'none'}"
        )
    ranges = {}
    for name, example in integer.items():
        found = (
            _declared(name, declared[name])
            if declared and name in declared
            else _derived(model, name, len(integer))
        )
        if found is None and example.numel() and int(example.min()) < int(example.max()):
            found = InputRange(int(example.min()), int(example.max()) + 1, "the example's values")
        if found is None:
            held = f"only {int(example.flatten()[0])}" if example.numel() else "no values"
            raise ExportError(
                f"cannot tell which values the integer input {name!r} takes (its example holds "
                f"{held}, and verifying on one value proves little). Pass "
                f"input_ranges={{{name!r}: (low, high)}} (--input-range {name}=LOW:HIGH on the "
                "command line), or an example with its real range of values"
            )
        ranges[name] = found
    return ranges


def describe_inputs(
    names: Sequence[str], tensors: Sequence[torch.Tensor], ranges: Mapping[str, InputRange]
) -> dict[str, str]:
    """What verification feeds each input: its range, coin flips, or standard normal values."""
    described = {}
    for name, example in zip(names, tensors, strict=True):
        if name in ranges:
            described[name] = ranges[name].describe()
        elif example.dtype == torch.bool:
            described[name] = "random booleans"
        else:
            described[name] = "standard normal values"
    return described


def random_values(
    shape: Sequence[int],
    example: torch.Tensor,
    value_range: InputRange | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """A fresh random tensor of ``shape`` and ``example``'s dtype, drawn as :func:`describe_inputs`
    says (integers need their range)."""
    if example.is_floating_point() or example.is_complex():
        return torch.randn(tuple(shape), generator=generator, dtype=example.dtype)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=generator).bool()
    assert value_range is not None, "integer_ranges gives every integer input a range"
    if value_range.padding_mask and len(shape) >= 2 and shape[-1] > 0:
        kept = torch.randint(1, shape[-1] + 1, (*shape[:-1], 1), generator=generator)
        return (torch.arange(shape[-1]) < kept).to(example.dtype)
    low, high = value_range.low, value_range.high
    return torch.randint(low, high, tuple(shape), generator=generator, dtype=example.dtype)
