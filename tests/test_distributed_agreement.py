"""How ranks agree after a step of a collective checkpoint operation (``collective.failures``):
every rank's error is rebuilt the same way on every rank, its own included, so that ranks that
decide by an error's type (fall back past a damaged step, or raise) all decide alike.

One process on a gloo group of one rank: the rebuilt errors are what every rank receives (the
multi-rank agreement itself is tested in tests/test_distributed.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import torchkeep as tk
from tests import _dist_harness as harness
from tests._compat import needs_sharded_checkpoints
from torchkeep.checkpoint.distributed import collective
from torchkeep.checkpoint.reader import StepVanishedError

pytestmark = needs_sharded_checkpoints


@pytest.fixture
def group(tmp_path: Path) -> Iterator[object]:
    import torch.distributed as dist

    with harness.one_rank_group(tmp_path):
        yield dist.group.WORLD


def test_no_failure_is_an_empty_report(group: object) -> None:
    assert collective.failures(None, group, "the test") == {}


@pytest.mark.parametrize(
    ("error", "kind", "text"),
    [
        # a torchkeep error type defined outside torchkeep.errors: rebuilt as its nearest
        # public ancestor, on this rank too, so its damage class is the same everywhere
        (StepVanishedError("step 5 vanished\nwhile read"), tk.TorchkeepFileNotFoundError,
         "step 5 vanished"),
        (tk.ChecksumMismatchError("shard-1: bytes differ\ndetails"), tk.ChecksumMismatchError,
         "shard-1: bytes differ"),
        (OSError("disk gone"), RuntimeError, "OSError: disk gone"),
    ],
)  # fmt: skip
def test_each_failure_is_rebuilt_alike_on_every_rank(
    group: object, error: BaseException, kind: type, text: str
) -> None:
    (rebuilt,) = collective.failures(error, group, "the test").values()
    assert type(rebuilt) is kind
    assert str(rebuilt) == text


def test_agree_raises_the_failed_ranks_own_error(group: object) -> None:
    error = StepVanishedError("step 5 vanished")
    with pytest.raises(StepVanishedError) as raised:
        collective.agree(error, group, "the test")
    assert raised.value is error
