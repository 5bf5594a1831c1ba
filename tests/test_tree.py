"""tree.flatten/unflatten: any supported nested value comes back exactly, without pickle."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

from torchkeep import tree
from torchkeep.errors import CorruptFileError, UnsupportedValueError

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool]

scalars = hst.one_of(
    hst.none(),
    hst.booleans(),
    hst.integers(min_value=-(2**70), max_value=2**70),
    hst.floats(allow_nan=True, allow_infinity=True),
    hst.text(max_size=8),
    hst.binary(max_size=8),
    hst.sampled_from(DTYPES),
    hst.sampled_from([torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")]),
    hst.lists(hst.integers(0, 5), max_size=3).map(torch.Size),
)
keys = hst.one_of(
    hst.text(max_size=6),
    hst.integers(-3, 3),
    hst.booleans(),
    hst.none(),
    hst.tuples(hst.integers()),
)
tensors = hst.builds(
    lambda shape, dtype, seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(
        dtype
    ),
    hst.lists(hst.integers(0, 3), max_size=3),
    hst.sampled_from(DTYPES),
    hst.integers(0, 100),
)
values = hst.recursive(
    hst.one_of(scalars, tensors),
    lambda children: hst.one_of(
        hst.lists(children, max_size=4),
        hst.lists(children, max_size=4).map(tuple),
        hst.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


def _same(a: Any, b: Any) -> bool:
    """Exact equality: same types all the way down, NaN equals NaN, tensors bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return (
            list(a) == list(b)
            and all(_same(a[k], b[k]) for k in a)
            and all(type(x) is type(y) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)


def _round_trip(value: object) -> object:
    flat = tree.flatten(value, root="v")
    skeleton = json.loads(json.dumps(flat.skeleton, allow_nan=False))  # strict JSON on disk
    return tree.unflatten(skeleton, flat.tensors)


@settings(max_examples=150, deadline=None)
@given(values)
def test_any_supported_value_round_trips_exactly(value: object) -> None:
    assert _same(value, _round_trip(value))


def test_optimizer_state_keeps_int_keys_tuples_and_order() -> None:
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    opt = torch.optim.AdamW(params, betas=(0.8, 0.9))
    sum(p.sum() for p in params).backward()
    opt.step()
    state = opt.state_dict()
    back = _round_trip(state)
    assert _same(state, back)
    assert back["param_groups"][0]["betas"] == (0.8, 0.9)
    assert list(back["state"]) == [0, 1]


def test_ordered_dict_comes_back_as_dict_in_order() -> None:
    value = OrderedDict([("b", 1), ("a", 2)])
    back = _round_trip(value)
    assert type(back) is dict
    assert list(back) == ["b", "a"]


def test_reserved_looking_keys_are_data() -> None:
    value = {"$tensor": "not a tensor", "$tuple": [1]}
    assert _round_trip(value) == value


def test_tensor_names_follow_paths_and_are_unique() -> None:
    t = torch.zeros(1)
    flat = tree.flatten({"state": {3: {"exp_avg": t}}, "a.b": t, "a": {"b": t}})
    assert sorted(flat.tensors) == ["a.b", "a.b#2", "state[3].exp_avg"]


class Foo:
    pass


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"state": {3: {"foo": Foo()}}}, "optimizer.state[3].foo"),
        ({"lambdas": [len]}, "optimizer.lambdas[0]"),
        ({"x": {1, 2}}, "optimizer.x"),
        ({"t": torch.zeros(2).to_sparse()}, "optimizer.t"),
    ],
)
def test_unsupported_value_names_its_path_and_the_fix(value: object, where: str) -> None:
    with pytest.raises(
        UnsupportedValueError, match=r"cannot save " + where.replace("[", r"\[")
    ) as info:
        tree.flatten(value, root="optimizer")
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    "skeleton",
    [
        {"$tensor": "missing"},
        {"$dtype": "Tensor"},
        {"$dtype": "__import__"},
        {"$unknown": 1},
        {"$dict": [[1]]},
        {"$float": "1e400"},
        {"$bytes": "!!!"},
        {"$tuple": 3},
        {"$a": 1, "b": 2},
    ],
)
def test_hostile_skeleton_is_a_corrupt_file_error(skeleton: object) -> None:
    with pytest.raises(CorruptFileError):
        tree.unflatten(skeleton, {}, source="state.json")
